"""The CPU model: which tier of kernels this process may run, probed once.

A tier is a set of instructions that a folder of kernels/ needs, each tier containing the ones before it:

    generic  no x86 SIMD assumed (LLVM's baseline for the machine; also what aarch64 gets)
    avx2     AVX2 + FMA + F16C: 16 vector registers of 8 floats (Haswell and later, AMD Zen 1-3)
    avx512   AVX-512 F/BW/DQ/VL: 32 registers of 16 floats (Skylake-X and later, AMD Zen 4-5)
    vnni     avx512 + AVX512-VNNI (vpdpbusd: byte dot products), Cascade Lake and later, AMD Zen 4-5
    amx      vnni + AMX tiles with bfloat16 products, and the kernel's permission to use them (Sapphire Rapids)

The tier is what Numba will compile for, not only what the CPU has: Numba compiles for the host, or for the
CPU named by NUMBA_CPU_NAME / NUMBA_CPU_FEATURES. TINYLLAMA_CPU=<tier> caps the tier for the whole process:
it names a CPU model of that tier to Numba (so that LLVM emits no instruction above it, and the Numba cache
keeps those builds apart), which works only before the first kernel compiles. A cap above what the CPU
has is an error. A model can also be loaded with a lower tier than the process's (`load(path, cpu="avx2")`):
that chooses the kernels of that tier from the table (kernels/table.py), while the loops LLVM vectorises by
itself still use the process's instructions.

AVX-VNNI (the 256-bit vpdpbusd of Intel's Alder Lake and later consumer chips) is not a tier of its own:
those CPUs run the avx2 kernels, whose maddubs/madd pairs compute the same sums.
"""

import functools
import os
import platform

TIERS = ("generic", "avx2", "avx512", "vnni", "amx")

# The LLVM features each tier needs, added to the ones of the tier before it.
_NEEDS = {
    "generic": set(),
    "avx2": {"avx", "avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl"},
    "vnni": {"avx512vnni"},
    "amx": {"amx-tile", "amx-bf16"},
}

# The CPU model named to Numba (LLVM) for a capped tier, with no extra features: its own set is the tier's.
CAP_CPU = {"generic": "generic", "avx2": "haswell", "avx512": "skylake-avx512", "vnni": "icelake-server"}

# Tiers of CPU models a user may name in NUMBA_CPU_NAME without NUMBA_CPU_FEATURES (LLVM's names).
_NAMED = {"generic": "generic", "x86-64": "generic", "x86-64-v2": "generic", "x86-64-v3": "avx2",
          "x86-64-v4": "avx512", "haswell": "avx2", "broadwell": "avx2", "skylake": "avx2", "alderlake": "avx2",
          "znver1": "avx2", "znver2": "avx2", "znver3": "avx2", "skylake-avx512": "avx512",
          "cascadelake": "vnni", "cooperlake": "vnni", "icelake-server": "vnni", "icelake-client": "vnni",
          "tigerlake": "vnni", "znver4": "vnni", "znver5": "vnni", "sapphirerapids": "amx",
          "emeraldrapids": "amx", "graniterapids": "amx"}


class TierError(ValueError):
    """A tier name that does not exist, or one above what this CPU (or this process's compiler) can run."""


def tier_of(features):
    """The highest tier whose features (and every lower tier's) are all in `features` (a set of names)."""
    best, needed = "generic", set()
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return "generic"
    for tier in TIERS[1:]:
        needed |= _NEEDS[tier]
        if not needed <= features:
            break
        best = tier
    return best


def _host_features():
    """The features LLVM finds on this CPU (llvmlite reads CPUID), as a set of names."""
    import llvmlite.binding as ll
    try:
        return {name for name, on in ll.get_host_cpu_features().items() if on}
    except RuntimeError:             # llvmlite cannot read them on this platform
        return set()


def _compiler_tier():
    """The tier of what Numba compiles for: NUMBA_CPU_FEATURES if given, else the CPU NUMBA_CPU_NAME names,
    else the host (None: the host)."""
    from numba.core import config
    if config.CPU_FEATURES:
        return tier_of({f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")})
    if config.CPU_NAME and config.CPU_NAME != "host":
        return _NAMED.get(config.CPU_NAME, "generic")
    return None


def _amx_permitted():
    """Linux gives a process the AMX tile state only on request; ask once (tinyllama_ref/platform.py)."""
    from ..platform import request_amx_tiles
    return request_amx_tiles()


@functools.lru_cache(maxsize=None)
def host_tier():
    """What this CPU itself can run (ignoring any cap), AMX only where the OS grants it."""
    tier = tier_of(_host_features())
    if tier == "amx" and not _amx_permitted():
        tier = "vnni"
    return tier


def _rank(tier):
    return TIERS.index(tier)


def check_tier(name, what="tier"):
    """name, if it is a tier's name; TierError otherwise."""
    if name not in TIERS:
        raise TierError(f"{what} {name!r} is not a CPU tier: choose one of {', '.join(TIERS)}")
    return name


def _codegen_started():
    """Whether Numba has already made its code generator (then its target can no longer change)."""
    from numba.core import registry
    return "_toplevel_target_context" in registry.cpu_target.__dict__


def apply_cap(tier):
    """Make Numba compile for `tier` (TINYLLAMA_CPU): a CPU model of that tier, no features beyond it.
    Must run before the first kernel compiles; a tier above the host's is a TierError."""
    check_tier(tier, "TINYLLAMA_CPU")
    host = host_tier()
    if _rank(tier) > _rank(host):
        raise TierError(f"TINYLLAMA_CPU={tier} is above what this CPU runs ({host}): choose one of "
                        f"{', '.join(TIERS[:_rank(host) + 1])}")
    if tier == host or tier == "amx":
        return
    from numba.core import config
    if _codegen_started() and (config.CPU_NAME, config.CPU_FEATURES) != (CAP_CPU[tier], ""):
        raise TierError(f"TINYLLAMA_CPU={tier} came after Numba started compiling for this process: set it in "
                        "the environment before starting Python")
    os.environ["NUMBA_CPU_NAME"], os.environ["NUMBA_CPU_FEATURES"] = CAP_CPU[tier], ""
    config.CPU_NAME, config.CPU_FEATURES = CAP_CPU[tier], ""
    process_tier.cache_clear()
    half_width_512.cache_clear()


@functools.lru_cache(maxsize=None)
def process_tier():
    """The tier every model of this process runs at most: the host's, lowered to what Numba compiles for."""
    host = host_tier()
    compiled = _compiler_tier()
    if compiled is None:
        return host
    return TIERS[min(_rank(host), _rank(compiled))]


def resolve(cpu=None):
    """The tier a model loaded with load(..., cpu=cpu) runs: the process's tier, or a lower one by name.
    Asking for a tier above the process's is a TierError that says what this CPU and process can run."""
    top = process_tier()
    if cpu is None:
        return top
    check_tier(cpu, "cpu")
    if _rank(cpu) > _rank(top):
        capped = top != host_tier()
        raise TierError(f"cpu={cpu!r} is above what this process runs ({top}"
                        f"{', capped by TINYLLAMA_CPU or NUMBA_CPU_NAME' if capped else ''}): choose one of "
                        f"{', '.join(TIERS[:_rank(top) + 1])}")
    return cpu


def runnable_tiers():
    """Every tier this process can run: the tests run the kernels once per tier in this list."""
    return TIERS[:_rank(process_tier()) + 1]


def at_least(tier, floor):
    """tier is floor or above it."""
    return _rank(tier) >= _rank(floor)


def describe():
    """One line for inspect / bench: the tier, why it is not the CPU's own where it is capped, and where
    exact act-order layers take the avx2 tier's kernels (table.repacked_tier)."""
    top, host = process_tier(), host_tier()
    note = f" (capped; the CPU runs {host})" if top != host else ""
    if top in ("avx512", "vnni") and half_width_512():
        note += "; exact act-order 4-bit layers on the avx2 kernels: 512-bit units of half width"
    return f"{top}{note}"


def cap_option(parser, value):
    """An argparse command's --cpu TIER: the cap applied (and left in the environment for the children it
    starts), or the command's usage error naming what this CPU runs."""
    if value is None:
        return
    try:
        apply_cap(value)
    except TierError as e:
        parser.error(str(e))
    os.environ["TINYLLAMA_CPU"] = value


def _cap_from_environment():
    """TINYLLAMA_CPU, read once when kernels/ is imported (kernels/__init__.py)."""
    wanted = os.environ.get("TINYLLAMA_CPU", "").strip().lower()
    if wanted and wanted != "native":
        apply_cap(wanted)



@functools.lru_cache(maxsize=None)
def fast_subnormals():
    """Whether this CPU multiplies subnormal float32 operands at full speed (AMD Zen: yes; Intel cores take a
    microcode assist), measured once by a timing probe (generic/subnormal.py). The AVX2 decode
    (avx2/gemv.py) feeds codes to its FMAs as subnormal floats only where this holds; its results are the
    same bits either way."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    from .generic.subnormal import subnormal_operands_fast
    return subnormal_operands_fast()


def host_name():
    """LLVM's name for this CPU (znver3, sapphirerapids, ...), for benchmark records."""
    import llvmlite.binding as ll
    return ll.get_host_cpu_name()


# LLVM's names of the CPUs that run each 512-bit instruction as two 256-bit halves (AMD Zen 4).
HALF_WIDTH_512 = frozenset({"znver4"})


@functools.lru_cache(maxsize=None)
def half_width_512():
    """Whether Numba compiles for a CPU whose AVX-512 units are 256 bits wide (HALF_WIDTH_512). There the
    avx512 and vnni tiers' wider tiles buy little, and table.repacked_tier gives act-order layers the avx2
    tier's exact kernels. A cap (TINYLLAMA_CPU, NUMBA_CPU_NAME or NUMBA_CPU_FEATURES) compiles for another
    CPU model, whose own name decides."""
    from numba.core import config
    if config.CPU_FEATURES:
        return False
    if config.CPU_NAME and config.CPU_NAME != "host":
        return config.CPU_NAME in HALF_WIDTH_512
    return host_name() in HALF_WIDTH_512
