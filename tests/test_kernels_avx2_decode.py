"""AVX2 decode: the exact float kernel (kernels/avx2/gemv.py) and the int8 mode (kernels/avx2/int8.py).

The float kernel is checked against x @ W in float64 from the independent packer, bit for bit where float32 is
exact (integer activations, power-of-two scales), and for batch invariance. The int8 kernel must give the VNNI
kernel's results bit for bit (the same integer sums, the same float32 steps): checked against it where this
CPU has AVX512-VNNI and Numba compiles for it, and everywhere with AVX2 against the NumPy statement beside it
(int64 sums, the same float32 fold) on layers whose scales are powers of two and zeros 0. Run this file also as an AVX2
CPU, `NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES="" NUMBA_CACHE_DIR=/tmp/numba-avx2 pytest ...`; the last
test compiles the kernels that way in a subprocess and checks no AVX-512 register is used."""

import os
import subprocess
import sys

import numpy as np
import pytest
from llvmlite import binding

from gptq_packer import make_layer
from tinyllama_ref.kernels import gptq
from tinyllama_ref.kernels.avx2 import int8 as avx2_int8
from tinyllama_ref.kernels.avx2 import gemv as avx2_gemv
from tinyllama_ref.kernels.vnni import int8 as vnni_int8


def _host_has(*flags):
    features = binding.get_host_cpu_features()
    return all(features.get(f, False) for f in flags)


CAPPED = os.environ.get("NUMBA_CPU_NAME", "host") not in ("", "host")      # Numba told to compile for another CPU
needs_avx2 = pytest.mark.skipif(not _host_has("avx2", "fma"), reason="needs a CPU with AVX2 and FMA")
VNNI = _host_has("avx512f", "avx512vnni") and not CAPPED
needs_vnni = pytest.mark.skipif(
    not VNNI,
    reason="the VNNI kernels to compare with need AVX512-VNNI and Numba compiling for this CPU "
           "(NUMBA_CPU_NAME caps it)")
pytestmark = needs_avx2

ROWS = (1, 2, 8, 17)
# (inputs, outputs, group size, act order, sym): odd widths for the scalar column tail, one or many segments
LAYERS = [(256, 77, 32, True, False), (512, 40, -1, False, False), (384, 93, 128, True, True),
          (256, 16, 64, False, True)]


def _wide(rng, shape):
    """float32 values over many binades, so that blocks mix large and tiny inputs."""
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6, size=shape)).astype(np.float32)


def _layer(n_in, n_out, group_size, act_order, sym, seed):
    rng = np.random.default_rng(seed)
    layer = make_layer(rng, n_in, n_out, 4, group_size, act_order=act_order, sym=sym)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq")
    assert avx2_gemv.supports(plan) and avx2_int8.supports(plan)
    return rng, layer, plan


def _codes_layer(rng, n_in, n_out, group_size):
    """Random 4-bit codes packed as the format says (nibble k of word r = input 8r + k), power-of-two scales
    per group and column, true zeros 0 (gptq_v2): the fold multiplies exactly and subtracts nothing, so y is
    the sum over segments of scale * accumulator with one rounding per addition."""
    codes = rng.integers(0, 16, size=(n_in, n_out), dtype=np.uint64)        # [in, out]
    words = np.zeros((n_in // 8, n_out), dtype=np.uint64)
    for k in range(8):
        words |= codes[k::8] << np.uint64(4 * k)
    groups = n_in // group_size
    qzeros = np.zeros((groups, -(-n_out // 8)), dtype=np.int32)
    scales = (2.0 ** rng.integers(-3, 4, size=(groups, n_out))).astype(np.float16)   # [G, out]
    g_idx = np.arange(n_in) // group_size
    plan = gptq.prepare(words.astype(np.uint32).view(np.int32), qzeros, scales, g_idx, 4, "gptq_v2")
    assert plan.perm is None and plan.const_zero == 0 and len(plan.seg_group) == groups
    return codes.astype(np.int64), scales.astype(np.float32), plan


def _fold_numpy(plan, scales, accumulate):
    """y [N, out]: segment by segment, y + scale_g * accumulate(first block, last block) in float32."""
    y = None
    for s, g in enumerate(plan.seg_group):
        acc = accumulate(plan.seg_start[s] // 4, plan.seg_start[s + 1] // 4)   # [N, out]
        y = scales[g] * acc if y is None else y + scales[g] * acc
    return y


@pytest.mark.parametrize("n_in,n_out,group_size,act_order,sym", LAYERS)
@pytest.mark.parametrize("block", [32, 40])
def test_gemv_is_float32_x_at_w(n_in, n_out, group_size, act_order, sym, block):
    """The float kernel against x @ W in float64 from the packer's own W: within float32 rounding of
    sum |x| |w| (one rounding per input of a segment, per segment and per fold), for 1 to 17 rows; `block` 40
    leaves 8 columns of every thread's block to the scalar loop."""
    rng, layer, plan = _layer(n_in, n_out, group_size, act_order, sym, n_in + n_out)
    w64 = layer["W"].astype(np.float64)                                        # [in, out]
    for n_rows in ROWS:
        x = _wide(rng, (n_rows, n_in))
        y = avx2_gemv.gptq_matmul_fma(plan, x, block)
        x64 = x.astype(np.float64)
        bound = (n_in + 2 * len(plan.seg_group) + 4) * 2.0 ** -24 * (np.abs(x64) @ np.abs(w64))
        assert (np.abs(y - x64 @ w64) <= bound).all()


@pytest.mark.parametrize("n_in,n_out,group_size", [(256, 77, 64), (512, 40, 512), (128, 93, 32)])
def test_gemv_is_exact_where_float32_is(n_in, n_out, group_size):
    """Small integer activations, power-of-two scales, zero 0: every product and partial sum is an integer
    below 2^24, so any correct order of float32 operations gives the int64 result exactly. Every code value
    sits in every nibble, the top one included (read by a shift, not a mask)."""
    rng = np.random.default_rng(n_in * 3 + n_out)
    codes, scales, plan = _codes_layer(rng, n_in, n_out, group_size)
    for n_rows in ROWS:
        x = rng.integers(-40, 41, size=(n_rows, n_in))
        expected = np.zeros((n_rows, n_out))
        for g in range(n_in // group_size):
            part = x[:, g * group_size:(g + 1) * group_size] @ codes[g * group_size:(g + 1) * group_size]
            expected += scales[g].astype(np.float64) * part
        for block in (32, 40):
            y = avx2_gemv.gptq_matmul_fma(plan, x.astype(np.float32), block)
            np.testing.assert_array_equal(y, expected.astype(np.float32))


def test_gemv_non_finite_rows_are_nan_and_zero_rows_zero():
    """A NaN or an infinity in a row's input reaches its outputs (every column of the row), an all-zero row
    gives zeros, and the other rows are unaffected."""
    rng, layer, plan = _layer(256, 77, 64, True, False, 5)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    x[0, 100] = np.nan
    x[1, 7] = np.inf
    x[2] = 0.0
    y = avx2_gemv.gptq_matmul_fma(plan, x, 32)
    assert np.isnan(y[0]).all() and not np.isfinite(y[1]).any()
    np.testing.assert_array_equal(y[2], np.zeros(77, dtype=np.float32))
    assert np.isfinite(y[3]).all()


def test_a_row_does_not_depend_on_its_batch():
    """Each row has its own sums in a fixed order whatever the chunk of rows it runs in (one row alone takes
    a wider strip): a row's output is the same bit for bit alone or in a batch of 8 or 17, for the float
    kernel and the int8 mode, with and without the scalar column tail."""
    rng, layer, plan = _layer(384, 93, 128, True, False, 11)
    x = _wide(rng, (17, 384))
    for block in (32, 40, 96):
        alone = [avx2_gemv.gptq_matmul_fma(plan, x[n:n + 1], block) for n in range(17)]
        np.testing.assert_array_equal(avx2_gemv.gptq_matmul_fma(plan, x, block), np.concatenate(alone))
        np.testing.assert_array_equal(avx2_gemv.gptq_matmul_fma(plan, x[3:11], block), np.concatenate(alone[3:11]))
    xp = gptq.permute_x(plan, x)
    alone = [_int8_matmul(avx2_int8, plan, xp[n:n + 1], 32) for n in range(17)]
    np.testing.assert_array_equal(_int8_matmul(avx2_int8, plan, xp, 32), np.concatenate(alone))


# layers for the one-row kernel on subnormal codes: row-major with a 13-column tail, strips (symmetric and not)
SUBNORMAL_LAYERS = [(256, 77, 32, True, False), (512, 128, 128, True, True), (1024, 352, 128, True, False),
                    (384, 256, 128, False, False)]


def _prepared(n_in, n_out, group_size, act_order, sym, seed):
    rng = np.random.default_rng(seed)
    layer = make_layer(rng, n_in, n_out, 4, group_size, act_order=act_order, sym=sym)
    return rng, gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq",
                             tier="avx2")


@pytest.mark.parametrize("n_in,n_out,group_size,act_order,sym", SUBNORMAL_LAYERS)
def test_one_row_on_subnormal_codes_has_the_conversion_kernels_bits(n_in, n_out, group_size, act_order, sym):
    """The one-row kernel that reads masked codes as subnormal floats scales every product and partial sum by
    the same power of two as the kernel that converts them: the same bits, for blocks that hold pairs of
    strips and leftovers (64, 96, 160, the whole layer), activations over many binades, and those scaled up
    to about 2^82 and down to 2^-80."""
    rng, plan = _prepared(n_in, n_out, group_size, act_order, sym, n_in + 3 * n_out)
    for scale in (1.0, 2.0 ** 60, 2.0 ** -60):
        x = (_wide(rng, (1, n_in)) * scale).astype(np.float32)
        for block in (64, 96, 160, n_out):
            np.testing.assert_array_equal(avx2_gemv.gptq_matmul_fma(plan, x, block, subnormal=True),
                                          avx2_gemv.gptq_matmul_fma(plan, x, block, subnormal=False))


def test_one_row_pairs_read_only_their_own_activations():
    """With every column in pairs of strips, the result comes from the subnormal-code kernel alone: the
    conversion kernel's activations are NaN and the output is still the exact one (so the test above compares
    two kernels, not one with itself)."""
    rng, plan = _prepared(512, 128, 128, True, False, 4)
    x = _wide(rng, (1, 512))
    gather = np.where(plan.perm >= 0, plan.perm, plan.n_in)
    xs = np.full((1, plan.n_padded), np.nan, dtype=np.float32)
    sumx = np.empty((1, len(plan.seg_group)), dtype=np.float32)
    xsub, unscale = np.empty((1, plan.n_padded), dtype=np.float32), np.empty(1, dtype=np.float32)
    avx2_gemv.scale_rows(x, gather, plan.seg_start, np.empty_like(xs), sumx, xsub, unscale)
    y = np.empty((1, 128), dtype=np.float32)
    avx2_gemv.gemv_fma(plan.qw, xs, sumx, plan.seg_start, plan.seg_group, plan.scales, plan.qzeros, plan.zero_add,
                       plan.const_zero, np.array([0, 128]), np.zeros(1, dtype=np.int64), 2, y, xsub, unscale,
                       avx2_gemv.SUB_MASKS)
    np.testing.assert_array_equal(y, avx2_gemv.gptq_matmul_fma(plan, x, 128, subnormal=False))
    assert plan.qw.ctypes.data % 64 == 0                      # repacked strips start on a cache line


def test_one_row_on_subnormal_codes_non_finite_and_zero_rows():
    """A NaN or an infinity in the row reaches every output as in the converting kernel (NaN: the codes 0 times
    infinity), and a zero row gives zeros (its scale S is the clamp's, 126)."""
    rng, plan = _prepared(512, 128, 128, True, False, 8)
    for bad in (np.nan, np.inf, -np.inf):
        x = rng.standard_normal((1, 512)).astype(np.float32)
        x[0, 100] = bad
        y = avx2_gemv.gptq_matmul_fma(plan, x, 128, subnormal=True)
        assert np.isnan(y).all()
        np.testing.assert_array_equal(y, avx2_gemv.gptq_matmul_fma(plan, x, 128, subnormal=False))
    zero = avx2_gemv.gptq_matmul_fma(plan, np.zeros((1, 512), dtype=np.float32), 128, subnormal=True)
    np.testing.assert_array_equal(zero, np.zeros((1, 128), dtype=np.float32))


def test_scale_rows_powers_and_sums_from_their_definitions():
    """scale_rows against the statement in its docstring, computed here with math.frexp and float64: S =
    125 - e clamped to [22, 126] for max |x| = m 2^e (0.5 <= m < 1), 125 for a NaN or an infinity, 126 for a
    zero or subnormal maximum; xsub and xs the gathered row times their powers of two, exactly; the sums per
    segment within float32 rounding of the float64 sum."""
    import math
    rng, plan = _prepared(512, 128, 128, True, False, 11)
    gather = np.where(plan.perm >= 0, plan.perm, plan.n_in)
    rows = [_wide(rng, (512,)), _wide(rng, (512,)) * np.float32(2.0 ** 90),
            _wide(rng, (512,)) * np.float32(2.0 ** -70), np.zeros(512), np.full(512, 1e-40), rng.standard_normal(512),
            rng.standard_normal(512) * np.float32(2.0 ** 110)]                       # the last: S at the clamp, 22
    rows[5][7] = np.inf
    for row in rows:
        x = np.asarray(row, dtype=np.float32)[None, :]                              # [1, 512]
        xs = np.empty((1, plan.n_padded), dtype=np.float32)
        xsub = np.empty((1, plan.n_padded), dtype=np.float32)
        sumx = np.empty((1, len(plan.seg_group)), dtype=np.float32)
        unscale = np.empty(1, dtype=np.float32)
        avx2_gemv.scale_rows(x, gather, plan.seg_start, xs, sumx, xsub, unscale)
        top = float(np.max(np.abs(x)))
        if not math.isfinite(top):
            shift = 125
        elif top < 2.0 ** -126:
            shift = 126
        else:
            shift = min(126, max(22, 125 - math.frexp(top)[1]))
        assert unscale[0] == np.float32(2.0 ** (149 - shift))
        xg = np.append(x[0], np.float32(0.0))[gather].astype(np.float64)             # [padded] plan order
        t = np.arange(plan.n_padded) % 8
        with np.errstate(over="ignore"):                                          # the infinity stays one
            np.testing.assert_array_equal(xsub[0], (xg * 2.0 ** (shift - avx2_gemv.SUB_SHIFT[t])).astype(np.float32))
            np.testing.assert_array_equal(xs[0], (xg * avx2_gemv.X_SCALE[t]).astype(np.float32))
        if math.isfinite(top):
            for s in range(len(plan.seg_group)):
                part = xg[plan.seg_start[s] * 8:plan.seg_start[s + 1] * 8]
                assert abs(sumx[0, s] - part.sum()) <= 8 * 2.0 ** -24 * np.abs(part).sum()


def test_one_row_takes_strided_activations():
    """A row that is a strided view (every other column of a wider array) gives the contiguous row's bits, on
    the subnormal-code kernel and on the converting one."""
    rng, plan = _prepared(512, 128, 128, True, False, 12)
    wide = _wide(rng, (1, 1024))
    x = wide[:, ::2]                                                              # [1, 512], not contiguous
    for subnormal in (True, False):
        np.testing.assert_array_equal(avx2_gemv.gptq_matmul_fma(plan, x, 128, subnormal=subnormal),
                                      avx2_gemv.gptq_matmul_fma(plan, np.ascontiguousarray(x), 128,
                                                                subnormal=subnormal))


def test_one_row_on_subnormal_codes_with_denormals_are_zero_set():
    """A thread whose MXCSR has DAZ set (flush-to-zero asked for by another library) reads subnormal operands as
    zero: the kernel clears DAZ for its task and puts it back after. One thread, so that the task runs on
    the thread whose DAZ is set here."""
    import numba
    from numba import njit

    @njit
    def product(a, b):
        return a * b

    @njit
    def set_daz(on):
        old = avx2_gemv._clear_daz()                          # returns MXCSR as it was, DAZ now cleared
        avx2_gemv._restore_mxcsr((old | avx2_gemv.DAZ) if on else (old & ~avx2_gemv.DAZ))

    rng, plan = _prepared(512, 128, 128, True, False, 6)
    x = _wide(rng, (1, 512))
    expected = avx2_gemv.gptq_matmul_fma(plan, x, 128, subnormal=False)
    tiny = np.float32(1e-40)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        set_daz(True)
        assert product(tiny, np.float32(1e30)) == 0.0        # DAZ is on for this thread
        y = avx2_gemv.gptq_matmul_fma(plan, x, 128, subnormal=True)
        assert product(tiny, np.float32(1e30)) == 0.0        # and still on after the kernel
    finally:
        set_daz(False)
        numba.set_num_threads(threads)
    assert product(tiny, np.float32(1e30)) > 0.0
    np.testing.assert_array_equal(y, expected)


def _int8_matmul(module, plan, xp, block):
    return module.gptq_matmul_int8(plan, xp, np.empty((xp.shape[0], plan.n_out), dtype=np.float32), block)


@needs_vnni
@pytest.mark.parametrize("n_in,n_out,group_size,act_order,sym", LAYERS)
@pytest.mark.parametrize("block", [32, 40])
def test_int8_equals_vnni_int8(n_in, n_out, group_size, act_order, sym, block):
    rng, layer, plan = _layer(n_in, n_out, group_size, act_order, sym, n_in * 5 + n_out)
    for n_rows in ROWS:
        xp = gptq.permute_x(plan, _wide(rng, (n_rows, n_in)))
        np.testing.assert_array_equal(_int8_matmul(avx2_int8, plan, xp, block),
                                      _int8_matmul(vnni_int8, plan, xp, block))


@pytest.mark.parametrize("n_in,n_out,group_size", [(256, 77, 64), (512, 40, 512), (128, 93, 32)])
def test_int8_is_the_integer_arithmetic(n_in, n_out, group_size):
    """Per block one exact integer dot product of the rounded activations (vnni.int8.quantize_activations,
    the NumPy statement of the rounding) with the codes, scaled and added: gemv_int8_numpy, compared for
    equality; several segments, odd widths, 1-17 rows."""
    rng = np.random.default_rng(n_in * 7 + n_out)
    codes, scales, plan = _codes_layer(rng, n_in, n_out, group_size)
    for n_rows in ROWS:
        x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
        _, d, x_hat = vnni_int8.quantize_activations(x)                    # [N, B] scales, [N, in]
        xq = np.rint(x_hat / np.repeat(d, 32, axis=1)).astype(np.int8)    # [N, in] in [-127, 127]
        expected = _fold_numpy(plan, scales, lambda b0, b1: avx2_int8.gemv_int8_numpy(
            codes[32 * b0:32 * b1], xq[:, 32 * b0:32 * b1], d[:, b0:b1]))
        for block in (32, 40):
            np.testing.assert_array_equal(_int8_matmul(avx2_int8, plan, x, block), expected)


def test_int8_non_finite_and_zero_rows_follow_vnni():
    """Zero rows give zeros; rows with a NaN or an infinity give what VNNI's kernel gives (the rounding,
    vnni.int8_gemm.quantize_rows, is shared: it does not carry a NaN through, see the report of issue 29)."""
    rng, layer, plan = _layer(256, 77, 64, False, False, 9)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    x[0, 100] = np.nan
    x[1, 7] = np.inf
    x[2] = 0.0
    xp = gptq.permute_x(plan, x)
    y = _int8_matmul(avx2_int8, plan, xp, 32)
    np.testing.assert_array_equal(y[2], np.zeros(77, dtype=np.float32))
    assert np.isfinite(y[3]).all()
    if VNNI:
        np.testing.assert_array_equal(y, _int8_matmul(vnni_int8, plan, xp, 32))


_ASM_SCRIPT = """
import re, sys
import numpy as np
sys.path.insert(0, {tests!r})
from gptq_packer import make_layer
from tinyllama_ref.kernels import gptq
from tinyllama_ref.kernels.avx2 import gemv, int8
from tinyllama_ref.kernels.generic import gptq_gemv
rng = np.random.default_rng(0)
layer = make_layer(rng, 256, 40, 4, 64, act_order=True, sym=False)
plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq")
x = rng.standard_normal((2, 256)).astype(np.float32)
xp = gptq.permute_x(plan, x)
gemv.gptq_matmul_fma(plan, x, 32)
int8.gptq_matmul_int8(plan, xp, np.empty((2, 40), np.float32), 32)
for name, fn in (("gemv", gemv.gemv_fma), ("int8", int8.gemv_int8)):
    for asm in fn.inspect_asm().values():
        print(name, len(re.findall("zmm", asm)), asm.count("vpmaddubsw"), asm.count("vpdpbusd"),
              asm.count("vfmadd"), asm.count("vcvtdq2ps"))
"""


def test_avx2_build_has_no_avx512_register(tmp_path):
    """Compiled as for an AVX2-only CPU (Numba's target capped to haswell, no extra features), the kernels
    hold no zmm register and no vpdpbusd; the int8 mode does use vpmaddubsw, the float kernel ymm FMAs and
    conversions."""
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    script = _ASM_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith(("gemv", "int8"))]
    assert [name for name, *_ in lines] == ["gemv", "int8"], out.stdout
    for name, zmm, maddubs, dpbusd, fma, cvt in lines:
        assert (int(zmm), int(dpbusd)) == (0, 0), (name, zmm, dpbusd)
        assert int(maddubs) > 0 if name == "int8" else (int(fma) > 0 and int(cvt) > 0), (name, maddubs, fma, cvt)


def test_gemv_code_conversion_is_the_unsigned_one():
    """kernels/generic/gptq_passes.py converts codes without an unsigned conversion where the target has none
    (a word's top code through 2^(23 + o) | q): every mask of every bit width, on words whose codes take every
    value, gives float32(word & mask) exactly, as NumPy's unsigned conversion does."""
    from numba import njit

    from tinyllama_ref.kernels.generic.gptq_passes import funnel_f32, masked_f32

    @njit
    def convert(words, out):
        for j in range(words.shape[0]):
            w = words[j]
            out[0, j] = masked_f32(w, 0xF0000000)
            out[1, j] = masked_f32(w, 0xC0000000)
            out[2, j] = masked_f32(w, 0xFF000000)
            out[3, j] = masked_f32(w, 0x0F000000)
            out[4, j] = masked_f32(w, 0x38000000)
            out[5, j] = funnel_f32(w, words[words.shape[0] - 1 - j], 30, 7)

    rng = np.random.default_rng(2)
    words = np.concatenate([np.arange(256, dtype=np.uint32) * np.uint32(0x01010101),
                            rng.integers(0, 2 ** 32, size=1000, dtype=np.uint64).astype(np.uint32)])
    out = np.empty((6, words.shape[0]), dtype=np.float32)
    convert(words, out)
    for row, mask in enumerate([0xF0000000, 0xC0000000, 0xFF000000, 0x0F000000, 0x38000000]):
        np.testing.assert_array_equal(out[row], (words & np.uint32(mask)).astype(np.float32))
    both = words.astype(np.uint64) | (words[::-1].astype(np.uint64) << np.uint64(32))
    np.testing.assert_array_equal(out[5], ((both >> np.uint64(30)) & np.uint64(7)).astype(np.float32))


@pytest.mark.parametrize("n_in,n_out,group_size,act_order,sym", SUBNORMAL_LAYERS)
def test_blocks_taken_in_turn_give_the_same_bits(n_in, n_out, group_size, act_order, sym):
    """Which thread computes which columns changes nothing: guided schedules for 1, 2 and 3 threads, run on
    one and on two threads, give the bits of fixed 32-column blocks, for one row (the subnormal-code kernel
    where it is fast) and for 8."""
    import numba
    from tinyllama_ref.kernels.generic import tasks
    rng, plan = _prepared(n_in, n_out, group_size, act_order, sym, 2 * n_in + n_out)
    unit = gptq._block_unit(plan)
    threads = numba.get_num_threads()
    try:
        for n_rows in (1, 8):
            x = _wide(rng, (n_rows, n_in))
            numba.set_num_threads(1)
            expected = avx2_gemv.gptq_matmul_fma(plan, x, 32)
            for run_on in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
                numba.set_num_threads(run_on)
                for planned in (1, 2, 3):
                    y = avx2_gemv.gptq_matmul_fma(plan, x, tasks.guided(n_out, unit, planned))
                    np.testing.assert_array_equal(y, expected)
    finally:
        numba.set_num_threads(threads)
