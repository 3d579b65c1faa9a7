"""Which kernel runs: one table from (layout, mode, bits, tier, rows) to a kernel, read by everything.

gptq_matmul (kernels/gptq.py) calls the kernel it names; the compile note asks about exactly its kernels;
the memory budget asks it whether int8 mode copies a streamed layer; docs/kernels.md is generated from it
(tools/kernel_table.py) and a test checks the two agree; the kernel tests run each tier's rows.

The rows are tried in order and the first that matches wins. A row matches a layer when its layout, mode,
bit width and tier are among the row's, the number of activation rows lies in its range, and its condition
(`when`, a property of the layer's shape named in CONDITIONS) holds. int8 mode (opt-in, approximate) tries
its own rows first and falls back to the exact rows for layers they do not serve.

The thresholds are measurements, each noted where it is defined below.
"""

import functools
from dataclasses import dataclass

from . import cpu
from .cpu import TIERS
from .generic.strips import STRIP, WIDE_STRIP

GEMV_MAX_ROWS = 32         # up to this many activation rows: fused GEMV (weights read once for all rows);
                           # beyond: tiles or slabs + BLAS. Measured on the 7B and 70B shapes, 4-bit: fused
                           # 1.5-3x faster at 16-32 rows, even at 64
INT8_GEMV_MAX_ROWS = 8     # int8 mode: up to this many rows the int8 GEMV (every row on each block of codes
                           # while it is in L1); beyond, the int8 GEMM's register tiles. A 7B layer's seven
                           # matmuls, 4-bit g128, VNNI, Zen 5, 2 threads: GEMV 3.5 vs GEMM 6.3 ms at 1 row,
                           # 7.6 vs 12.1 at 8, 10.7 vs 15.3 at 12, 16.3 vs 12.6 at 16
INT8_STRIPS_GEMV_MAX_ROWS = 256   # int8 mode on layers in strips (the avx2 tier): the GEMV's accumulators are
                           # [rows, 32] per strip, in L1 or L2, and it beats the AVX2 int8 GEMM (8 x 8 tiles, which
                           # spill on 16 ymm) at every row count: a 7B layer's seven 4-bit g128 matmuls, 2 threads,
                           # Zen 5 capped to AVX2, one process: 8 rows 8.0 against 26.4 ms, 23 rows 21.3 against
                           # 33.8, 64 rows 60 against 84, 128 rows 129 against 162, 256 rows 268 against 329, 512
                           # rows 507 against 525. Row-major layers keep INT8_GEMV_MAX_ROWS: there the accumulators
                           # span a task's columns, and 64 rows took 208 against the GEMM's 78 ms
INPLACE_GEMV_MAX_ROWS = 32 # "inplace" plans: up to this many rows take gemv_inplace (codes decoded once for all
                           # rows) rather than slabs + BLAS; 70B shapes, 4-bit g128, Zen 5, 2 threads: 32 rows
                           # 50-52 ms against 80-84, 64 rows 120-125 against 110-127
AMX_INPLACE_GEMV_ROWS = 4  # ... but with AMX, past this many rows the gathered code tiles are faster (70B shapes,
                           # 4-bit g128, 2 threads: tie at 4 rows, 1.3-1.4x at 6)
SPLIT_AMX_MAX_ROWS = 3     # with AMX, "segments" 4-bit layers leave split8 for the code tiles past this many rows
                           # (70B shapes: tie to 1.4x at 4 rows, 1.7-2.5x at 8; split8 0.56-0.63x the float
                           # GEMV's time at 1-16 rows on the Xeon)

AVX2_TILES_MIN_ROWS = 24  # AVX2: from this many rows the 6 x 16 tiles (a panel of codes decoded once into L1, then
                           # 12 FMAs per 2 panel loads and 6 broadcasts) match avx2/gemv.py in decode; a 7B layer's
                           # seven 4-bit g128 matmuls, 2 threads, Zen 4 capped to AVX2: 16 rows 58 against 70 ms,
                           # 24 rows 86 against 84, 32 rows 114 against 108

STRIP_TIERS = ("avx2",)   # tiers whose repacked 4-bit layers are stored in column strips (generic/strips.py): a
                           # decode thread reads its columns as one run of memory. A 7B layer's seven matmuls,
                           # 1 row, 2 threads, Zen 4 capped to AVX2 (avx2/gemv.py on both layouts, one process):
                           # 4.3-4.7 against 5.3-5.8 ms at a quiet hour, 8.3 against 13.4 on a contended host;
                           # 8 rows 18.3-18.8 against 18.6-19.5; int8 mode's decode (avx2/int8.py), 1 row
                           # 3.6-4.2 against 4.2-4.5 ms, 8 rows 10.3-10.7 against 10.9-11.3

ALL_BITS = (2, 3, 4, 8)
ANY_ROWS = (1, None)
DECODE = (1, GEMV_MAX_ROWS)
PREFILL = (GEMV_MAX_ROWS + 1, None)
ABOVE_AVX2 = ("avx512", "vnni", "amx")


@dataclass(frozen=True)
class Kernel:
    """A kernel as the table names it: where it lives, what it is, and the Numba functions it compiles
    ("module:function" under tinyllama_ref.kernels, resolved only when asked)."""
    file: str
    what: str
    compiled: tuple


KERNELS = {
    "gemv": Kernel("generic/gptq_gemv.py", "fused float GEMV over segments of one group",
                   ("generic.gptq_gemv:gemv",)),
    "blas_slabs": Kernel("generic/gptq_prefill.py", "float32 slabs of W dequantized, then BLAS",
                         ("generic.gptq_prefill:dequantize_slab",)),
    "gemv_inplace": Kernel("generic/gptq_inplace.py", "GEMV reading act-order codes in checkpoint order",
                           ("generic.gptq_inplace:gemv_inplace",)),
    "blas_slabs_inplace": Kernel("generic/gptq_inplace.py", "slabs dequantized through g_idx, then BLAS",
                                 ("generic.gptq_inplace:dequantize_slab_inplace",)),
    "gemv_avx2": Kernel("avx2/gemv.py", "exact decode: codes decoded once by AND + convert, one FMA a row "
                        "(one row where subnormal operands are fast: AND + FMA on 64 columns)",
                        ("avx2.gemv:scale_rows", "avx2.gemv:gemv_fma", "generic.subnormal:_multiply_add")),
    "tiles_avx2": Kernel("avx2/tiles.py", "6 x 16 float32 register tiles decoding the codes",
                         ("avx512.gptq_tiles:pack_x", "avx2.tiles:slab_segments")),
    "tiles_avx2_inplace": Kernel("avx2/tiles.py", "6 x 16 register tiles, codes read through g_idx",
                                 ("avx512.gptq_tiles:pack_x", "avx2.tiles:slab_inplace")),
    "int8_gemv_avx2": Kernel("avx2/int8.py", "int8 mode decode: maddubs/madd over rounded x",
                             ("vnni.int8_gemm:quantize_rows", "avx2.int8:gemv_int8")),
    "int8_gemm_avx2": Kernel("avx2/int8_gemm.py", "int8 mode prefill: maddubs/madd register tiles",
                             ("vnni.int8_gemm:quantize_rows", "avx2.int8_gemm:gemm_int8")),
    "tiles": Kernel("avx512/gptq_tiles.py", "12 x 32 float32 register tiles decoding the codes",
                    ("avx512.gptq_tiles:pack_x", "avx512.gptq_tiles:slab_segments")),
    "tiles_inplace": Kernel("avx512/gptq_tiles.py", "12 x 32 register tiles, codes read through g_idx",
                            ("avx512.gptq_tiles:pack_x", "avx512.gptq_tiles:slab_inplace")),
    "split8": Kernel("vnni/split8.py", "exact decode: x in four int8 pieces, vpdpbusd dot products",
                     ("vnni.split8:split_rows", "vnni.split8:gemv_split")),
    "int8_gemv": Kernel("vnni/int8.py", "int8 mode decode: vpdpbusd over rounded x",
                        ("vnni.int8_gemm:quantize_rows", "vnni.int8:gemv_int8")),
    "int8_gemm": Kernel("vnni/int8_gemm.py", "int8 mode prefill: vpdpbusd register tiles",
                        ("vnni.int8_gemm:quantize_rows", "vnni.int8_gemm:gemm_int8")),
    "int8_repacked": Kernel("gptq.py", "int8 mode on a streamed layer: codes copied in group order (repack_inplace), "
                            "then the tier's int8 GEMM", ()),
    "amx_codes": Kernel("amx/amx_codes.py", "4-bit codes straight into bfloat16 AMX tiles",
                        ("amx.amx_codes:split_x_paired", "amx.amx_codes:product_codes")),
    "amx_gathered": Kernel("amx/amx_codes.py", "act-order codes gathered in group order into AMX tiles",
                           ("amx.amx:split_x", "amx.amx_codes:product_gathered")),
    "amx_slabs": Kernel("amx/amx.py", "dequantized slabs split into two bfloat16s on AMX tiles",
                        ("amx.amx:split_x", "amx.amx:product_segments")),
    "amx_slabs_inplace": Kernel("amx/amx.py", "the same, codes read through g_idx",
                                ("amx.amx:split_x", "amx.amx:product_inplace")),
}


@dataclass(frozen=True)
class Rule:
    layout: str              # "segments" (resident, sorted by group), "strips" (the same in column strips) or
                             # "inplace" (streamed act-order)
    mode: str                # "exact" (float32, the default) or "int8" (opt-in, approximate)
    bits: tuple              # bit widths served
    tiers: tuple             # tiers this row is for
    rows: tuple              # (first, last) activation rows; last None: no limit
    kernel: str              # a key of KERNELS
    when: str = ""           # a key of CONDITIONS, or "" for none


def _whole_blocks(layer):
    return layer.layout in ("segments", "strips") and layer.whole_blocks


def _amx_codes(layer):
    return _whole_blocks(layer) and layer.bits == 4 and layer.n_out % 32 == 0


CONDITIONS = {
    "whole blocks": _whole_blocks,                       # every segment starts on 32 inputs (4 packed words)
    "4-bit blocks, 32-col": _amx_codes,                  # ... and whole 32-column blocks (amx_codes.supports)
    "32-column": lambda layer: layer.n_out % 32 == 0,    # whole 32-column blocks of y (AMX accumulators)
    "whole units": lambda layer: layer.whole_units,      # every input in a whole unit of packed words (tiles)
    "3-bit or whole blocks": lambda layer: layer.layout == "segments" and (layer.bits == 3 or layer.whole_blocks),
}

TABLE = (
    # int8 mode (opt-in), tried first; a layer none of these serves takes the exact rows
    Rule("segments", "int8", (4,), ("vnni", "amx"), (1, INT8_GEMV_MAX_ROWS), "int8_gemv", "whole blocks"),
    Rule("segments", "int8", (3, 4), ("vnni", "amx"), (INT8_GEMV_MAX_ROWS + 1, None), "int8_gemm",
         "3-bit or whole blocks"),
    Rule("segments", "int8", (4,), ("avx2", "avx512"), (1, INT8_GEMV_MAX_ROWS), "int8_gemv_avx2", "whole blocks"),
    Rule("segments", "int8", (3, 4), ("avx2", "avx512"), (INT8_GEMV_MAX_ROWS + 1, None), "int8_gemm_avx2",
         "3-bit or whole blocks"),
    Rule("inplace", "int8", (4,), ("amx",), (INT8_GEMV_MAX_ROWS + 1, None), "amx_gathered", "32-column"),
    Rule("inplace", "int8", (3, 4), ("avx2",) + ABOVE_AVX2, (INT8_GEMV_MAX_ROWS + 1, None), "int8_repacked"),
    # repacked 4-bit layers in column strips (strip_width): only kernels that read both layouts
    Rule("strips", "int8", (4,), ("avx2",), (1, INT8_STRIPS_GEMV_MAX_ROWS), "int8_gemv_avx2", "whole blocks"),
    Rule("strips", "int8", (4,), ("avx2",), (INT8_STRIPS_GEMV_MAX_ROWS + 1, None), "int8_gemm_avx2",
         "whole blocks"),
    Rule("strips", "exact", (4,), ("avx2",), (1, AVX2_TILES_MIN_ROWS - 1), "gemv_avx2"),
    Rule("strips", "exact", (4,), ("avx2",), (AVX2_TILES_MIN_ROWS, None), "tiles_avx2", "whole units"),
    # exact, resident layers ("segments")
    Rule("segments", "exact", (4,), ("amx",), (1, SPLIT_AMX_MAX_ROWS), "split8", "4-bit blocks, 32-col"),
    Rule("segments", "exact", (4,), ("amx",), (SPLIT_AMX_MAX_ROWS + 1, None), "amx_codes", "4-bit blocks, 32-col"),
    Rule("segments", "exact", (4,), ("vnni", "amx"), DECODE, "split8", "whole blocks"),
    Rule("segments", "exact", (3, 4), ("avx2",), (AVX2_TILES_MIN_ROWS, GEMV_MAX_ROWS), "tiles_avx2", "whole units"),
    Rule("segments", "exact", (4,), ("avx2", "avx512"), DECODE, "gemv_avx2"),
    Rule("segments", "exact", ALL_BITS, TIERS, DECODE, "gemv"),
    Rule("segments", "exact", (2, 3, 4), ("amx",), PREFILL, "amx_slabs", "32-column"),
    Rule("segments", "exact", (3, 4), ("avx512", "vnni"), PREFILL, "tiles", "whole units"),
    Rule("segments", "exact", (3, 4), ("avx2",), PREFILL, "tiles_avx2", "whole units"),
    Rule("segments", "exact", ALL_BITS, TIERS, PREFILL, "blas_slabs"),
    # exact, streamed act-order layers read in place ("inplace")
    Rule("inplace", "exact", (4,), ("amx",), (1, AMX_INPLACE_GEMV_ROWS), "gemv_inplace", "32-column"),
    Rule("inplace", "exact", (4,), ("amx",), (AMX_INPLACE_GEMV_ROWS + 1, None), "amx_gathered", "32-column"),
    Rule("inplace", "exact", ALL_BITS, TIERS, (1, INPLACE_GEMV_MAX_ROWS), "gemv_inplace"),
    Rule("inplace", "exact", (2, 3, 4), ("amx",), (INPLACE_GEMV_MAX_ROWS + 1, None), "amx_slabs_inplace",
         "32-column"),
    Rule("inplace", "exact", (3, 4), ("avx512", "vnni"), (INPLACE_GEMV_MAX_ROWS + 1, None), "tiles_inplace",
         "whole units"),
    Rule("inplace", "exact", (3, 4), ("avx2",), (INPLACE_GEMV_MAX_ROWS + 1, None), "tiles_avx2_inplace",
         "whole units"),
    Rule("inplace", "exact", ALL_BITS, TIERS, (INPLACE_GEMV_MAX_ROWS + 1, None), "blas_slabs_inplace"),
)


@dataclass(frozen=True)
class Layer:
    """What the table looks at in a layer: made from a plan (layer_of) or by hand (the budget, the docs).
    layout: "segments" (resident, sorted by group, row-major), "strips" (the same in column strips) or
    "inplace" (streamed act-order)."""
    layout: str
    bits: int
    n_out: int
    whole_blocks: bool = True
    whole_units: bool = True


def layer_of(plan):
    """The table's view of a prepared plan (kernels/gptq.py), made once per plan."""
    layer = plan.__dict__.get("_table_layer")
    if layer is None:
        layer = plan.__dict__["_table_layer"] = _layer_of(plan)
    return layer


def _layer_of(plan):
    from .generic.gptq_passes import unit_shape
    unit_words, unit_codes = unit_shape(plan.bits)
    whole_units = plan.n_packed >= plan.n_padded // unit_codes * unit_words
    if plan.layout == "inplace":
        return Layer("inplace", plan.bits, plan.n_out, False, whole_units)
    return Layer("strips" if plan.strip != plan.n_out else "segments", plan.bits, plan.n_out, plan.whole_blocks,
                 whole_units)


def _matches(rule, layer, rows, mode, tier):
    first, last = rule.rows
    return (rule.layout == layer.layout and rule.mode == mode and layer.bits in rule.bits and tier in rule.tiers
            and rows >= first and (last is None or rows <= last)
            and (not rule.when or CONDITIONS[rule.when](layer)))


@functools.lru_cache(maxsize=4096)
def choose(layer, rows, mode="exact", tier="generic"):
    """The name of the kernel (a key of KERNELS) for `rows` activation rows of this layer (remembered: a 7B
    decode step asks 224 times, for a handful of distinct layers)."""
    modes = ("int8", "exact") if mode == "int8" else ("exact",)
    for m in modes:
        for rule in TABLE:
            if _matches(rule, layer, rows, m, tier):
                return rule.kernel
    raise LookupError(f"no kernel for {layer} at {rows} rows, mode {mode}, tier {tier}")   # the last rows match all


def boundaries(mode="exact"):
    """Row counts at which some rule starts or stops: choosing at each covers every kernel a layer can reach."""
    edges = {1}
    for rule in TABLE:
        first, last = rule.rows
        edges.add(first)
        if last is not None:
            edges.add(last)
            edges.add(last + 1)
    return sorted(edges)


def kernels_for(layer, mode="exact", tier="generic", max_rows=None):
    """Every kernel name the table can choose for this layer (up to max_rows activation rows), in order."""
    names = []
    for rows in boundaries(mode):
        if max_rows is not None and rows > max_rows:
            break
        name = choose(layer, rows, mode, tier)
        if name not in names:
            names.append(name)
    return names


def int8_copies(layer, tier):
    """Whether int8 mode copies a streamed ("inplace") layer of this shape in group order for its many-row calls
    (the memory budget reserves the largest copy)."""
    return choose(layer, INT8_GEMV_MAX_ROWS + 1, "int8", tier) == "int8_repacked"


@functools.lru_cache(maxsize=None)
def kernels_reading(layout):
    """The kernels the table names for a layout: gptq.run refuses any other (a kernel that reads row-major
    words would compute garbage from a plan in strips)."""
    return frozenset(rule.kernel for rule in TABLE if rule.layout == layout)


def strip_width(tier, bits, n_out, mode="exact"):
    """Columns per strip of a repacked layer of this tier, bit width, width and mode (generic/strips.py), or 0
    where it stays row-major (STRIP_TIERS, 4 bits, a multiple of 32 wide): what the mode's one-row decode
    reads a call, 64 columns in exact mode where the layer allows it, else 32."""
    if tier not in STRIP_TIERS or bits != 4 or n_out % STRIP:
        return 0
    return WIDE_STRIP if mode == "exact" and n_out % WIDE_STRIP == 0 else STRIP


def repacked_tier(tier, bits, mode):
    """The tier whose kernels run a layer that gptq.prepare repacks at load (act-order, several groups), when
    the caller named none: `tier`, the process's, except for exact 4-bit layers on a CPU whose 512-bit units
    are half width (cpu.half_width_512: AMD Zen 4), which take the avx2 tier's kernels, on strips. int8 mode
    keeps the VNNI kernels, whose prefill is the faster there."""
    # Measured on Zen 4 (vnni tier, 2 threads, 7B 4-bit g128 act-order, a model at each tier in one process,
    # alternating rounds): the avx2 tier's kernels ran pp512 at 13.27 against 12.65 tokens/s (4 of 4 rounds
    # faster) and decoded 1.10-1.13x faster (codes read as subnormal floats from strips, against split8 on
    # row-major layers); int8 mode's VNNI GEMM prefilled 1.56x faster than the avx2 tier's.
    if mode == "exact" and bits == 4 and tier in ("avx512", "vnni") and cpu.half_width_512():
        return "avx2"
    return tier


def int8_available(tier):
    """Whether int8 mode has kernels at this tier (at generic it has none, and is refused at load)."""
    return any(rule.mode == "int8" and tier in rule.tiers for rule in TABLE)


@functools.lru_cache(maxsize=None)
def dispatchers(name):
    """The Numba dispatchers a kernel compiles (for the compile note), as a tuple."""
    import importlib
    out = []
    for ref in KERNELS[name].compiled:
        module, attr = ref.split(":")
        out.append(getattr(importlib.import_module(f"{__package__}.{module}"), attr))
    return tuple(out)


def markdown():
    """The table as docs/kernels.md shows it (tools/kernel_table.py writes it; a test compares)."""
    def rows_text(r):
        first, last = r.rows
        return f"{first}+" if last is None else (f"{first}" if first == last else f"{first}-{last}")
    lines = ["| layout | mode | bits | tiers | rows | kernel | when | file |", "|---|---|---|---|---|---|---|---|"]
    for r in TABLE:
        tiers = "all" if r.tiers == TIERS else ", ".join(r.tiers)
        bits = ", ".join(map(str, r.bits))
        lines.append(f"| {r.layout} | {r.mode} | {bits} | {tiers} | {rows_text(r)} | `{r.kernel}` | {r.when or '-'} "
                     f"| kernels/{KERNELS[r.kernel].file} |")
    lines += ["", "| kernel | what it does |", "|---|---|"]
    lines += [f"| `{name}` | {k.what} |" for name, k in KERNELS.items()]
    return "\n".join(lines) + "\n"
