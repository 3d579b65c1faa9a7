"""The AVX2 prefill kernels (kernels/avx2/tiles.py, kernels/avx2/int8_gemm.py) against float64, against the
AVX-512 kernels they reshape, and against an independent NumPy statement of the int8 sums.

- tiles: every output takes the 12 x 32 tiles' arithmetic in the same order (one FMA per input into one
  accumulator, the same runs, the same folds), so the results are compared BIT FOR BIT with
  avx512/gptq_tiles.py's (run through the same steps, avx2.tiles.matmul_on), and within float32 round-off of
  float64 by tests/test_kernels_tiles.py's bound. Widths that are not multiples of 16 put columns into the
  scalar loop here and into vector lanes there (48: all vector here, 16 scalar there), so the bit-equality also
  checks the vector lanes against the scalar loop.
- int8 GEMM: integer sums are exact and the float steps are the VNNI kernel's, so bit-equal to vnni/int8_gemm.py
  where this CPU (and the compile target) has AVX512-VNNI, and equal to the NumPy reference below anywhere.
- the assembly: compiled in a subprocess for an AVX2-only CPU (haswell), no zmm register anywhere.

These run on any CPU with AVX2 + FMA (the process's tier, kernels/cpu.py); run them capped with
NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES="" (TINYLLAMA_CPU=avx2) to compile them as an AVX2 CPU would.
"""

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gptq_packer import make_layer
from tinyllama_ref import quant
from tinyllama_ref.kernels import gptq
from tinyllama_ref.kernels.generic import strips


def _tiers():
    """(this process can run AVX2 kernels, ... AVX512-VNNI kernels): the process's tier (kernels/cpu.py), which
    is lowered by NUMBA_CPU_NAME / TINYLLAMA_CPU to what Numba compiles for."""
    try:
        from tinyllama_ref.kernels import cpu
        tier = cpu.process_tier()
        return cpu.at_least(tier, "avx2"), cpu.at_least(tier, "vnni")
    except ImportError:                                   # before kernels/cpu.py: the host's features
        import llvmlite.binding as ll
        have = {k for k, v in ll.get_host_cpu_features().items() if v}
        return {"avx2", "fma", "f16c"} <= have, "avx512vnni" in have


AVX2, VNNI = _tiers()
pytestmark = pytest.mark.skipif(not AVX2, reason="needs a CPU (and compile target) with AVX2 + FMA + F16C")

if AVX2:
    from tinyllama_ref.kernels.avx2 import int8_gemm as avx2_int8
    from tinyllama_ref.kernels.avx2 import tiles
    from tinyllama_ref.kernels.avx512 import gptq_tiles

F32 = np.float32
ROWS = (33, 64, 100)                 # packed tiles 12+12+12 (3 padded rows), 4x12+2x8, 7x12+2x8


def _plan(layer, bits, fmt="gptq", repack=True):
    return gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, fmt,
                        repack=repack)


def _close(y, x, w):
    """tests/test_kernels_tiles.py's bound: within the error of a float32 dot product whose terms are added at
    most ~128 + in/128 deep, against the float64 result."""
    exact = x.astype(np.float64) @ w.astype(np.float64)                     # [N, out]
    bound = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)     # [N, out]
    depth = 128 + w.shape[0] / 128
    assert np.all(np.abs(y - exact) <= depth * 2.0 ** -24 * bound + 1e-30)


def _tiles_12x32(plan, x):
    """avx512/gptq_tiles.py's 12 x 32 tiles through the same steps as tiles.tiles_matmul."""
    return tiles.matmul_on(plan, x, gptq_tiles.slab_segments, gptq_tiles.slab_inplace)


CASES = [dict(bits=4, group_size=128, act_order=True), dict(bits=4, group_size=32, sym=False),
         dict(bits=3, group_size=128, act_order=True),
         dict(bits=3, group_size=64, sym=False, checkpoint_format="gptq_v2"),
         dict(bits=4, group_size=-1), dict(bits=3, group_size=32, act_order=True, sym=False)]
LAYOUTS = [(case, True) for case in CASES] + [(dict(case, act_order=True), False) for case in CASES
                                              if case["group_size"] != -1]


def _id(case, repack):
    return "-".join(f"{k}={v}" for k, v in case.items()) + ("-segments" if repack else "-inplace")


@pytest.mark.parametrize("case,repack", LAYOUTS, ids=[_id(c, r) for c, r in LAYOUTS])
def test_tiles_match_float64_and_the_12x32_tiles_bit_for_bit(case, repack):
    rng = np.random.default_rng(17)
    case = dict(case)
    bits, fmt = case["bits"], case.pop("checkpoint_format", "gptq")
    layer = make_layer(rng, 384, 96, checkpoint_format=fmt, **case)
    plan = _plan(layer, bits, fmt, repack)
    assert plan.layout == ("segments" if repack else "inplace") and tiles.supports(plan)
    for n_rows in ROWS:
        x = rng.normal(size=(n_rows, 384)).astype(F32)
        y = tiles.tiles_matmul(plan, x)
        assert y.shape == (n_rows, 96) and y.dtype == np.float32
        _close(y, x, layer["W"])
        np.testing.assert_array_equal(y, _tiles_12x32(plan, x))


@pytest.mark.parametrize("n_in,n_out,bits,group_size,act_order", [
    (200, 40, 4, 64, False),    # last group short; 32 columns of vectors, 8 scalar (both tiles)
    (96, 33, 3, 64, True),      # one column past the vectors
    (64, 8, 4, 32, True),       # fewer columns than a tile: all scalar
    (256, 48, 4, 64, True),     # 48: all vector here, 16 scalar in the 12 x 32 tiles
    (1024, 70, 3, 128, False),  # several chunks of inputs, 6 scalar columns
    (256, 56, 3, 32, True),     # 48 vector + 8 scalar here, 32 + 24 there
])
@pytest.mark.parametrize("repack", [True, False], ids=["segments", "inplace"])
def test_tiles_odd_shapes(n_in, n_out, bits, group_size, act_order, repack):
    rng = np.random.default_rng(n_in + n_out)
    layer = make_layer(rng, n_in, n_out, bits, group_size, act_order=act_order, sym=False)
    plan = _plan(layer, bits, repack=repack)
    for n_rows in ROWS:
        x = rng.normal(size=(n_rows, n_in)).astype(F32)
        y = tiles.tiles_matmul(plan, x)
        _close(y, x, layer["W"])
        np.testing.assert_array_equal(y, _tiles_12x32(plan, x))


@pytest.mark.parametrize("repack", [True, False], ids=["segments", "inplace"])
def test_tiles_narrow_slabs(monkeypatch, repack):
    """Many slabs (a partial last one) across threads."""
    monkeypatch.setattr(tiles, "slab_columns", lambda n_out, n_rows, threads: 64)
    rng = np.random.default_rng(5)
    layer = make_layer(rng, 256, 200, 4, 32, act_order=True, sym=False)
    plan = _plan(layer, 4, repack=repack)
    x = rng.normal(size=(45, 256)).astype(F32)
    y = tiles.tiles_matmul(plan, x)
    _close(y, x, layer["W"])
    np.testing.assert_array_equal(y, _tiles_12x32(plan, x))


@pytest.mark.parametrize("repack", [True, False], ids=["segments", "inplace"])
def test_tiles_a_row_gets_the_same_numbers_in_any_tile(repack):
    """Register tiles of 6 and 4 rows (packed tiles of 12, 8, 4) do each row's arithmetic in the same order: a
    row's numbers do not depend on the other rows of the call."""
    rng = np.random.default_rng(21)
    layer = make_layer(rng, 256, 64, 4, 64, act_order=True, sym=False)
    plan = _plan(layer, 4, repack=repack)
    x = rng.normal(size=(64, 256)).astype(F32)
    batch = tiles.tiles_matmul(plan, x)
    for lo, hi in ((0, 1), (3, 8), (30, 64), (7, 40)):
        np.testing.assert_array_equal(tiles.tiles_matmul(plan, x[lo:hi]), batch[lo:hi])


@pytest.mark.parametrize("repack", [True, False], ids=["segments", "inplace"])
def test_tiles_rows_in_several_blocks(repack):
    """More rows than one block of BLOCK_TILES packed tiles (the panel goes round each block in turn)."""
    rng = np.random.default_rng(8)
    layer = make_layer(rng, 512, 72, 4, 128, act_order=True, sym=False)
    plan = _plan(layer, 4, repack=repack)
    x = rng.normal(size=(12 * tiles.BLOCK_TILES * 2 + 29, 512)).astype(F32)
    y = tiles.tiles_matmul(plan, x)
    _close(y, x, layer["W"])
    np.testing.assert_array_equal(y, _tiles_12x32(plan, x))


def test_tiles_sum_no_less_accurately_than_float32_matmul():
    """Against float64 on a deep layer: within a small multiple of a float32 matmul's error."""
    rng = np.random.default_rng(70)
    layer = make_layer(rng, 4096, 64, 4, 128, act_order=True)
    x = rng.normal(size=(40, 4096)).astype(F32)
    exact = x.astype(np.float64) @ layer["W"].astype(np.float64)
    blas = np.abs(x @ layer["W"].astype(F32) - exact).max()
    for repack in (True, False):
        ours = np.abs(tiles.tiles_matmul(_plan(layer, 4, repack=repack), x) - exact).max()
        assert ours <= 3 * blas, (repack, ours, blas)


# ---- int8 GEMM ----

def _round_rows(xp):
    """xq int64 [N, padded], d float32 [N, blocks]: round(x / d) (half to even) clipped to +-127, d = max|x| / 127
    per block of 32 inputs (1 for an all-zero block): the int8 mode's rounding (vnni/int8.py)."""
    n, m = xp.shape
    blocks = xp.reshape(n, m // 32, 32)
    d = (np.abs(blocks).max(axis=2) / F32(127)).astype(F32)                  # [N, B]
    d[d == 0] = F32(1)
    xq = np.clip(np.rint(blocks / d[:, :, None]), -127, 127).astype(np.int64)   # [N, B, 32]
    return xq.reshape(n, m), d


def _int8_reference(plan, xp):
    """y [N, out]: per block of 32 inputs an int64 dot product in NumPy, then the float32 fold in the kernels'
    order: acc = acc + f32(tot) * d per block; y = y + s * (acc - z * sumx) per segment."""
    xq, d = _round_rows(xp)
    words = strips.to_rows(plan.qw, plan.n_out)                             # [R, out], either layout
    q = quant.unpack_columns(words.view(np.int32), plan.bits, plan.n_padded).astype(np.int64)   # [padded, out]
    scales = plan.scales.view(np.float16).astype(F32)                       # [G, out]
    n_out = q.shape[1]
    zeros = quant.unpack_zeros(plan.qzeros.view(np.int32), plan.bits, n_out)
    zeros = quant.true_zeros(zeros, plan.bits, "gptq" if plan.zero_add else "gptq_v2").astype(F32)   # [G, out]
    per_unit = 32 if plan.bits == 3 else 8
    y = np.zeros((xp.shape[0], n_out), dtype=F32)
    for s, g in enumerate(plan.seg_group):
        acc = np.zeros_like(y)
        sumx = np.zeros(xp.shape[0], dtype=F32)
        for i in range(plan.seg_start[s] * per_unit, plan.seg_start[s + 1] * per_unit, 32):
            b = i // 32
            tot = xq[:, i:i + 32] @ q[i:i + 32]                              # [N, out] exact integers
            acc = acc + tot.astype(F32) * d[:, b:b + 1]
            sumx = sumx + xq[:, i:i + 32].sum(axis=1).astype(F32) * d[:, b]
        y = y + scales[g] * (acc - zeros[g] * sumx[:, None])
    return y


INT8_SHAPES = [(256, 96, 32, True, True, "gptq"), (512, 77, 128, True, False, "gptq"),
               (256, 40, -1, False, False, "gptq_v2"), (384, 272, 64, False, True, "gptq"),
               (160, 33, 32, True, False, "gptq_v2")]


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("n_in,n_out,group_size,act_order,sym,fmt", INT8_SHAPES)
def test_int8_gemm_equals_the_numpy_integer_reference(bits, n_in, n_out, group_size, act_order, sym, fmt):
    rng = np.random.default_rng(n_in * 7 + n_out + bits)
    layer = make_layer(rng, n_in, n_out, bits, group_size, act_order=act_order, sym=sym, checkpoint_format=fmt)
    plan = _plan(layer, bits, fmt)
    assert avx2_int8.supports(plan)
    for n_rows in (1, 9, 33, 70):                       # single rows, tiles of 8 and a remainder
        x = rng.normal(size=(n_rows, n_in)).astype(F32)
        x[0, :32] = 0.0                                 # an all-zero block
        x[-1] *= 40.0                                   # a row with large activations
        xp = gptq.permute_x(plan, x)
        y = avx2_int8.gptq_matmul_int8_gemm(plan, xp)
        assert y.shape == (n_rows, n_out) and y.dtype == np.float32
        np.testing.assert_array_equal(y, _int8_reference(plan, xp))


@pytest.mark.skipif(not VNNI, reason="the VNNI int8 GEMM needs AVX512-VNNI (in the CPU and the compile target)")
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("n_in,n_out,group_size,act_order,sym,fmt", INT8_SHAPES)
def test_int8_gemm_bit_equal_to_the_vnni_kernel(bits, n_in, n_out, group_size, act_order, sym, fmt):
    from tinyllama_ref.kernels.vnni import int8_gemm as vnni_int8
    rng = np.random.default_rng(n_in * 5 + n_out + bits)
    layer = make_layer(rng, n_in, n_out, bits, group_size, act_order=act_order, sym=sym, checkpoint_format=fmt)
    plan = _plan(layer, bits, fmt)
    for n_rows in (9, 64, 100):
        x = rng.normal(size=(n_rows, n_in)).astype(F32) * rng.uniform(0.01, 50, size=(n_rows, 1)).astype(F32)
        xp = gptq.permute_x(plan, x)
        np.testing.assert_array_equal(avx2_int8.gptq_matmul_int8_gemm(plan, xp),
                                      vnni_int8.gptq_matmul_int8_gemm(plan, xp))


def test_int8_extreme_codes_do_not_overflow_int16():
    """All codes 15 against all activations +-127 (the docstring's bound: |h| = 16 * 15 * 127 = 30480 per int16
    lane): still the exact integer sums."""
    rng = np.random.default_rng(3)
    layer = make_layer(rng, 256, 24, 4, 128, sym=False)
    plan = _plan(layer, 4)
    plan.qw[:] = np.uint32(0xFFFFFFFF)                  # every code 15
    for sign in (1.0, -1.0):
        x = np.full((6, 256), sign, dtype=F32)          # every xq = +-127
        x[3] *= np.where(np.arange(256) % 2, 1, -1).astype(F32)
        xp = gptq.permute_x(plan, x)
        np.testing.assert_array_equal(avx2_int8.gptq_matmul_int8_gemm(plan, xp), _int8_reference(plan, xp))


# ---- the assembly an AVX2-only CPU gets ----

_ASM_SCRIPT = textwrap.dedent("""
    import re, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from gptq_packer import make_layer
    from tinyllama_ref.kernels import gptq
    from tinyllama_ref.kernels.avx2 import int8_gemm, tiles
    rng = np.random.default_rng(0)
    for bits in (4, 3):
        for sym in (True, False):
            layer = make_layer(rng, 256, 48, bits, 64, act_order=True, sym=sym)
            for repack in (True, False):
                plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits,
                                    "gptq", repack=repack)
                x = rng.normal(size=(20, 256)).astype(np.float32)
                tiles.tiles_matmul(plan, x)
                if repack:
                    int8_gemm.gptq_matmul_int8_gemm(plan, gptq.permute_x(plan, x))
    for f in (tiles.decode_panel, tiles.panel_tile, int8_gemm.gemm_int8):
        for sig in f.signatures:
            asm = f.inspect_asm(sig)
            print(f.__name__, len(re.findall(r"%zmm", asm)), len(re.findall(r"vfmadd\\w+\\s+[^\\n]*%ymm", asm)),
                  asm.count("vpmaddubsw"))
""")


def test_avx2_kernels_compile_without_zmm(tmp_path):
    """Compiled for haswell (AVX2 + FMA + F16C, no AVX-512): no zmm register anywhere (panel decode, register
    tiles, int8 GEMM), ymm FMAs in the float tiles and vpmaddubsw in the int8 GEMM."""
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("TINYLLAMA_CPU", None)
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _ASM_SCRIPT.format(tests=tests)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()
            if re.match(r"^(decode_panel|panel_tile|gemm_int8) ", line)]
    assert {r[0] for r in rows} == {"decode_panel", "panel_tile", "gemm_int8"}
    for name, zmm, fma, maddubs in rows:
        assert int(zmm) == 0, name
        if name == "panel_tile":
            assert int(fma) > 0, name
        elif name == "gemm_int8":
            assert int(maddubs) > 0, name
