"""The CPU model (kernels/cpu.py) and the kernel table (kernels/table.py): tier names from feature sets, the
cap, errors for people, docs/kernels.md generated from the table, and every runnable tier's kernels against
x @ W of the independent packer (tests/gptq_packer.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import tinyllama_ref
from gptq_packer import make_layer
from tiers import RUNNABLE, TOP
from tinyllama_ref.errors import ConfigError
from tinyllama_ref.kernels import cpu, gptq, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HASWELL = {"sse2", "avx", "avx2", "fma", "f16c", "bmi2"}                 # Zen 3 has these and no AVX-512
ZEN4 = HASWELL | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vnni", "avx512bf16"}


@pytest.mark.parametrize("features,tier", [
    (set(), "generic"), ({"sse2", "avx"}, "generic"), ({"avx", "avx2", "fma"}, "generic"),   # no F16C
    (HASWELL, "avx2"), (HASWELL | {"avxvnni"}, "avx2"), (HASWELL | {"avx512f"}, "avx2"),
    (HASWELL | {"avx512f", "avx512bw", "avx512dq", "avx512vl"}, "avx512"), (ZEN4, "vnni"),
    (ZEN4 | {"amx-tile", "amx-bf16", "amx-int8"}, "amx"),
    ({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vnni"}, "generic"),   # tiers nest: no AVX2, none
])
def test_tier_of_features(monkeypatch, features, tier):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    assert cpu.tier_of(features) == tier


def test_other_architectures_are_generic(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert cpu.tier_of({"neon", "fp-armv8"} | HASWELL) == "generic"


def test_amx_refused_by_the_kernel_is_vnni(monkeypatch):
    """The CPU has AMX but Linux (or the VM) refuses the tile state: the tier is vnni, so no SIGILL later."""
    monkeypatch.setattr(cpu, "_host_features", lambda: ZEN4 | {"amx-tile", "amx-bf16"})
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "_amx_permitted", lambda: False)
    cpu.host_tier.cache_clear()
    try:
        assert cpu.host_tier() == "vnni"
    finally:
        cpu.host_tier.cache_clear()


def test_a_named_numba_cpu_sets_the_compiler_tier(monkeypatch):
    from numba.core import config
    for name, tier in (("haswell", "avx2"), ("generic", "generic"), ("skylake-avx512", "avx512"),
                       ("icelake-server", "vnni"), ("some-future-cpu", "generic")):
        monkeypatch.setattr(config, "CPU_NAME", name)
        monkeypatch.setattr(config, "CPU_FEATURES", "")
        assert cpu._compiler_tier() == tier
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx,+avx2,+fma,+f16c,-avx512f")
    assert cpu._compiler_tier() in ("avx2", "generic")        # generic where this is not an x86 machine


def test_half_width_512_is_named_by_the_cpu_numba_compiles_for(monkeypatch):
    """Zen 4 (LLVM's znver4) runs each 512-bit instruction as two 256-bit halves; Zen 5, Intel and a cap that
    names another CPU model do not."""
    from numba.core import config
    cases = ((("znver4", None, ""), True), (("znver4", "host", ""), True), (("znver5", None, ""), False),
             (("sapphirerapids", None, ""), False), (("znver4", "icelake-server", ""), False),
             (("znver3", "znver4", ""), True), (("znver4", None, "+avx,+avx2,+fma,+f16c"), False))
    try:
        for (host, name, features), expected in cases:
            monkeypatch.setattr(cpu, "host_name", lambda host=host: host)
            monkeypatch.setattr(config, "CPU_NAME", name)
            monkeypatch.setattr(config, "CPU_FEATURES", features)
            cpu.half_width_512.cache_clear()
            assert cpu.half_width_512() == expected, (host, name, features)
    finally:
        cpu.half_width_512.cache_clear()


@pytest.mark.parametrize("half", [True, False], ids=["half-width-512", "full-width"])
def test_act_order_layers_on_half_width_512_take_the_avx2_kernels(monkeypatch, half):
    """At the vnni tier on a CPU whose 512-bit units are half width, an exact 4-bit layer repacked at load
    (act-order) runs the avx2 tier's kernels, on strips, when no tier is named; int8 mode, 3 bits, a
    zero-copy layer and a named tier keep the vnni tier's."""
    monkeypatch.setattr(cpu, "process_tier", lambda: "vnni")
    monkeypatch.setattr(cpu, "half_width_512", lambda: half)
    rng = np.random.default_rng(9)

    def prepare(bits=4, act_order=True, **kw):
        layer = make_layer(rng, 256, 128, bits, 64, act_order=act_order)
        return gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, "gptq",
                            **kw)
    plan = prepare()
    assert (plan.tier, table.layer_of(plan).layout) == (("avx2", "strips") if half else ("vnni", "segments"))
    assert table.choose(table.layer_of(plan), 1, "exact", plan.tier) == ("gemv_avx2" if half else "split8")
    assert prepare(mode="int8").tier == "vnni"
    assert prepare(bits=3).tier == "vnni"
    assert prepare(act_order=False).tier == "vnni"
    assert prepare(tier="vnni").tier == "vnni"


def test_load_refuses_a_tier_by_name(tmp_path):
    from tinyllama_ref.make.synth import synthesize
    path = str(tmp_path / "q")
    synthesize(path, preset="tiny", bits=4, group_size=32, layers=1, quiet=True)
    with pytest.raises(ConfigError, match="not a CPU tier: choose one of generic, avx2"):
        tinyllama_ref.load(path, cpu="sse9")
    above = cpu.TIERS[cpu.TIERS.index(TOP) + 1:] if TOP != "amx" else ()
    for tier in above:
        with pytest.raises(ConfigError, match=f"above what this process runs \\({TOP}"):
            tinyllama_ref.load(path, cpu=tier)
    assert tinyllama_ref.load(path, cpu="generic").model.cpu == "generic"


def test_int8_mode_is_refused_at_the_generic_tier(tmp_path):
    from tinyllama_ref.make.synth import synthesize
    path = str(tmp_path / "q")
    synthesize(path, preset="tiny", bits=4, group_size=32, layers=1, quiet=True)
    with pytest.raises(ConfigError, match="no kernels at CPU tier generic"):
        tinyllama_ref.load(path, cpu="generic", gptq_mode="int8")


def test_docs_show_the_table():
    """docs/kernels.md holds table.markdown() between its markers (tools/kernel_table.py writes it)."""
    with open(os.path.join(ROOT, "docs", "kernels.md")) as f:
        text = f.read()
    start, end = "<!-- table: generated by tools/kernel_table.py -->\n", "<!-- end of table -->"
    assert start in text and end in text, "docs/kernels.md lost its markers"
    assert text.split(start)[1].split(end)[0] == table.markdown()


def test_every_rule_names_a_kernel_and_a_known_condition():
    for rule in table.TABLE:
        assert rule.kernel in table.KERNELS and set(rule.tiers) <= set(cpu.TIERS)
        assert not rule.when or rule.when in table.CONDITIONS
    # every (layout, mode, bits, tier, rows) finds a kernel, and never one above its tier's folder
    for tier in cpu.TIERS:
        for layout in ("segments", "inplace"):
            for bits in table.ALL_BITS:
                for mode in ("exact", "int8"):
                    layer = table.Layer(layout, bits, 96)
                    for rows in table.boundaries():
                        name = table.choose(layer, rows, mode, tier)
                        file = table.KERNELS[name].file
                        folder = file.split("/")[0] if "/" in file else "generic"   # a tier's folder
                        assert cpu.at_least(tier, folder), (tier, name)


CASES = [dict(bits=4, group_size=32), dict(bits=4, group_size=128, act_order=True),
         dict(bits=4, group_size=64, act_order=True, repack=False), dict(bits=3, group_size=32),
         dict(bits=3, group_size=64, act_order=True, repack=False), dict(bits=2, group_size=32),
         dict(bits=8, group_size=64)]


def _id(case):
    return "-".join(f"{k}{v}" for k, v in case.items())


@pytest.mark.parametrize("tier", RUNNABLE)
@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("mode", ["exact", "int8"])
def test_every_tier_runs_the_kernel_the_table_names(monkeypatch, tier, case, mode):
    """For each runnable tier, layout and bit width, at every row count where the table changes its mind: the
    kernel that runs is the one the table names, its Numba functions are among those the compile note asks
    about (kernels_for), and y equals x @ W (exact: float32 round-off; int8: the rounding of x to 8 bits)."""
    if mode == "int8" and not table.int8_available(tier):
        pytest.skip(f"int8 mode has no kernels at the {tier} tier")
    case = dict(case)
    repack = case.pop("repack", True)
    n_in, n_out = 256, 96
    layer = make_layer(np.random.default_rng(5), n_in, n_out, **case)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], case["bits"], "gptq",
                        repack=repack, tier=tier)
    ran = []
    for name, fn in list(gptq.RUN.items()):
        monkeypatch.setitem(gptq.RUN, name, lambda p, x, name=name, fn=fn: ran.append(name) or fn(p, x))
    for name, bind in list(gptq.BIND.items()):              # decode calls bound once per plan (gptq.bound_call)
        monkeypatch.setitem(gptq.BIND, name, lambda *args, name=name, bind=bind: (
            lambda call: lambda x: ran.append(name) or call(x))(bind(*args)))
    listed = {d for name in table.kernels_for(table.layer_of(plan), mode, tier) for d in table.dispatchers(name)}
    rng = np.random.default_rng(6)
    for rows in [r for r in table.boundaries() if r <= 72]:
        x = rng.standard_normal((rows, n_in)).astype(np.float32)
        ran.clear()
        y = gptq.gptq_matmul(plan, x, mode)
        expected = table.choose(table.layer_of(plan), rows, mode, tier)
        assert ran[0] == expected
        assert set(table.dispatchers(expected)) <= listed
        exact = x.astype(np.float64) @ layer["W"]
        scale = np.abs(x).sum(axis=1, keepdims=True) * np.abs(layer["W"]).max()
        tol = 2e-6 if mode == "exact" else 2e-2            # int8 rounds x to 1/254 of each block's largest
        assert np.all(np.abs(y - exact) <= tol * scale), (rows, expected)


def _run_capped(tier, code, cache):
    env = dict(os.environ, TINYLLAMA_CPU=tier, NUMBA_CACHE_DIR=cache)
    env.pop("NUMBA_CPU_NAME", None)
    env.pop("NUMBA_CPU_FEATURES", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif("avx2" not in RUNNABLE, reason=f"needs the avx2 tier; this process runs {TOP}")
def test_capped_to_avx2_no_instruction_above_it(tmp_path):
    """TINYLLAMA_CPU=avx2: the process's tier is avx2, Numba compiles for a CPU of that tier, and the AVX2
    tier's kernels (and the generic ones it calls) hold no zmm register in their assembly."""
    code = """
import numpy as np
from tinyllama_ref.kernels import cpu, gptq, table
from gptq_packer import make_layer
assert cpu.process_tier() == "avx2", cpu.process_tier()
layer = make_layer(np.random.default_rng(1), 256, 96, 4, 64, act_order=True)
plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq")
assert plan.tier == "avx2"
seen = set()
for rows in (1, 40):
    for mode in ("exact", "int8"):
        x = np.random.default_rng(2).standard_normal((rows, 256)).astype(np.float32)
        gptq.gptq_matmul(plan, x, mode)
        seen.add(table.choose(table.layer_of(plan), rows, mode, "avx2"))
bad = []
for name in seen:
    for d in table.dispatchers(name):
        for sig in d.signatures:
            if "zmm" in d.inspect_asm(sig):
                bad.append(d.__name__)
print("kernels", sorted(seen), "zmm in", bad)
assert not bad
"""
    env_code = f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n" + code
    p = _run_capped("avx2", env_code, str(tmp_path / "cache"))
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_cap_above_the_cpu_is_an_error(tmp_path):
    if TOP == "amx":
        pytest.skip("no tier above amx")
    above = cpu.TIERS[cpu.TIERS.index(cpu.host_tier()) + 1]
    p = _run_capped(above, "import tinyllama_ref.kernels", str(tmp_path / "cache"))
    assert p.returncode != 0 and f"TINYLLAMA_CPU={above} is above what this CPU runs" in p.stderr


def test_generate_capped_to_generic_matches_numpy(tmp_path):
    """CI's check of the lowest tier on a tiny model: logits of the numba backend compiled for a generic CPU
    (no F16C on x86: fp16 scales are widened with integer operations) equal the numpy reference's, and that
    widening is exact for all 65,536 half values."""
    from tinyllama_ref.make.synth import synthesize
    path = str(tmp_path / "q")
    synthesize(path, preset="tiny", bits=4, group_size=32, act_order=True, layers=2, quiet=True)
    code = f"""
import json, tinyllama_ref
from tinyllama_ref.kernels import cpu
assert cpu.process_tier() == "generic"
ids = list(range(1, 41))
fast = tinyllama_ref.load({path!r}, backend="numba").model.logits(ids)
ref = tinyllama_ref.load({path!r}, backend="numpy").model.logits(ids)
import numpy as np
print(float(np.abs(fast - ref).max()))
assert np.allclose(fast, ref, rtol=1e-4, atol=1e-4)
from numba import njit
from tinyllama_ref.kernels.generic.half import f16_to_f32
@njit
def widen(u):
    out = np.empty(u.shape[0], np.float32)
    for i in range(u.shape[0]):
        out[i] = f16_to_f32(u[i])
    return out
u = np.arange(65536, dtype=np.uint16)
want, got = u.view(np.float16).astype(np.float32), widen(u)
nan = np.isnan(want)
assert np.array_equal(want[~nan].view(np.uint32), got[~nan].view(np.uint32)) and np.isnan(got[nan]).all()
"""
    p = _run_capped("generic", code, str(tmp_path / "cache"))
    assert p.returncode == 0, p.stdout + p.stderr
