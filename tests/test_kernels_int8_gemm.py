"""The opt-in int8 prefill GEMM (kernels/vnni/int8_gemm.py) against a NumPy reference of the same integer arithmetic.

The reference below is written from the module docstring and the GPTQ format (codes unpacked by
quant.unpack_columns, zeros by quant.true_zeros), not from the kernel: per block of 32 inputs an exact integer
dot product, then float32 steps in the documented order. Every step is one IEEE float32 operation, so the
kernel must agree bit for bit: the tests assert equality.
"""

import numpy as np
import pytest

from gptq_packer import make_layer
from tinyllama_ref import quant
from tinyllama_ref.kernels import gptq, table
from tinyllama_ref.kernels.generic import strips
from tiers import RUNNABLE, below, needs
from tinyllama_ref.kernels.vnni import int8, int8_gemm

pytestmark = needs("vnni")

F32 = np.float32


def _round_rows(xp):
    """xq int64 [N, padded] and d float32 [N, blocks]: round(x / d) clipped to +-127, d = max|x| / 127 per block
    of 32 (1 for an all-zero block)."""
    n, m = xp.shape
    blocks = xp.reshape(n, m // 32, 32)
    d = (np.abs(blocks).max(axis=2) / F32(127)).astype(F32)                  # [N, B]
    d[d == 0] = F32(1)
    xq = np.clip(np.rint(blocks / d[:, :, None]), -127, 127).astype(np.int64)   # [N, B, 32]
    return xq.reshape(n, m), d


def _plan_codes(plan):
    """The plan's integer codes [padded, out] in its own row order (each column one bit stream)."""
    words = strips.to_rows(plan.qw, plan.n_out)                             # [R, out], either layout
    return quant.unpack_columns(words.view(np.int32), plan.bits, plan.n_padded).astype(np.int64)


def _reference(plan, xp):
    """y [N, out] by the module docstring's steps, with NumPy."""
    xq, d = _round_rows(xp)
    q = _plan_codes(plan)                                                    # [padded, out]
    scales = plan.scales.view(np.float16).astype(F32)                       # [G, out]
    n_out = q.shape[1]
    zeros = quant.unpack_zeros(plan.qzeros.view(np.int32), plan.bits, n_out)
    zeros = quant.true_zeros(zeros, plan.bits, "gptq" if plan.zero_add else "gptq_v2").astype(F32)   # [G, out]
    codes_per_unit = 32 if plan.bits == 3 else 8
    y = np.zeros((xp.shape[0], n_out), dtype=F32)
    for s, g in enumerate(plan.seg_group):
        i0, i1 = plan.seg_start[s] * codes_per_unit, plan.seg_start[s + 1] * codes_per_unit
        acc = np.zeros_like(y)
        sumx = np.zeros(xp.shape[0], dtype=F32)
        for i in range(i0, i1, 32):
            b = i // 32
            tot = xq[:, i:i + 32] @ q[i:i + 32]                              # [N, out] exact integers
            acc = acc + tot.astype(F32) * d[:, b:b + 1]
            sumx = sumx + xq[:, i:i + 32].sum(axis=1).astype(F32) * d[:, b]
        y = y + scales[g] * (acc - zeros[g] * sumx[:, None])
    return y


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("n_in,n_out,group_size,act_order,sym,fmt", [
    (256, 96, 32, True, True, "gptq"),
    (512, 77, 128, True, False, "gptq"),
    (256, 40, -1, False, False, "gptq_v2"),
    (384, 272, 64, False, True, "gptq"),       # more than one strip of 256 columns, an odd last strip
    (160, 33, 32, True, False, "gptq_v2"),     # a single column past the vectors
])
def test_gemm_equals_the_integer_reference(bits, n_in, n_out, group_size, act_order, sym, fmt):
    rng = np.random.default_rng(n_in * 7 + n_out + bits)
    layer = make_layer(rng, n_in, n_out, bits, group_size, act_order=act_order, sym=sym, checkpoint_format=fmt)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, fmt)
    assert int8_gemm.supports(plan)
    for n_rows in (9, 8 * 3 + 5):                                           # full tiles of 8 and single rows
        x = rng.normal(size=(n_rows, n_in)).astype(F32)
        x[1, :32] = 0.0                                                      # an all-zero block
        x[2] *= 40.0                                                         # a row with large activations
        xp = gptq.permute_x(plan, x)
        y = gptq.gptq_matmul(plan, x, mode="int8")
        np.testing.assert_array_equal(y, _reference(plan, xp))
        exact = x @ layer["W"]
        err = np.abs(y - exact).max() / np.abs(exact).max()
        assert 1e-4 < err < 0.03                                             # approximate, really, but close


def test_quantize_rows_matches_the_numpy_rounding():
    rng = np.random.default_rng(5)
    xp = rng.normal(size=(11, 256)).astype(F32)
    xp[3, 64:96] = 0.0
    xp[4, :32] = 0.5                                                         # d = 1 for this block, so
    xp[4, 0], xp[4, 1:6] = 127.0, [2.5, -3.5, 0.5, -0.5, 126.5]              # these are ties: half to even
    blocks = np.array([0, 2, 8], dtype=np.int64)                            # segments of 2 and 6 blocks
    xw = np.empty((8, 11, 8), dtype=np.int32)                               # [blocks, N, 8] block-major
    xscale = np.empty((8, 11), dtype=F32)                                   # [blocks, N]
    sumx = np.empty((11, 2), dtype=F32)
    int8_gemm.quantize_rows(xp, blocks, xw, xscale, sumx)
    packed, scale, _ = int8.quantize_activations(xp)                        # the decode path's NumPy rounding
    np.testing.assert_array_equal(xw, packed.reshape(11, 8, 8).transpose(1, 0, 2))
    np.testing.assert_array_equal(xscale, scale.T)
    xq, d = _round_rows(xp)
    for s in range(2):
        total = np.zeros(11, dtype=F32)
        for b in range(blocks[s], blocks[s + 1]):
            total = total + xq[:, 32 * b:32 * b + 32].sum(axis=1).astype(F32) * d[:, b]
        np.testing.assert_array_equal(sumx[:, s], total)


def test_int8_mode_chooses_gemv_gemm_or_exact_by_rows_and_layout(monkeypatch):
    rng = np.random.default_rng(9)
    layer = make_layer(rng, 256, 64, 4, 64, act_order=True)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq")
    many = rng.normal(size=(table.INT8_GEMV_MAX_ROWS + 1, 256)).astype(F32)
    np.testing.assert_array_equal(gptq.gptq_matmul(plan, many, "int8"), _reference(plan, gptq.permute_x(plan, many)))
    # Streamed act-order layers ("inplace" plans): without AMX, many rows are copied in group order for the
    # call and take the same int8 GEMM, so they equal the resident layer's integer reference. With AMX they
    # stay on the exact code tiles (faster there than the copy + int8 GEMM). Decode rows stay exact.
    inplace = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq",
                           repack=False)
    assert inplace.layout == "inplace" and not int8_gemm.supports(inplace)
    for tier in [t for t in RUNNABLE if t in ("vnni", "amx")]:
        amx_here = tier == "amx"
        inplace = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq",
                               repack=False, tier=tier)
        y = gptq.gptq_matmul(inplace, many, "int8")
        if amx_here:
            np.testing.assert_array_equal(y, gptq.gptq_matmul(inplace, many))
            np.testing.assert_allclose(y, many @ layer["W"], rtol=1e-4, atol=1e-4 * np.abs(y).max())
        else:
            np.testing.assert_array_equal(y, _reference(plan, gptq.permute_x(plan, many)))
    few = many[:3]
    exact = few @ layer["W"]
    np.testing.assert_allclose(gptq.gptq_matmul(inplace, few, "int8"), exact, rtol=1e-4,
                               atol=1e-4 * np.abs(exact).max())
    # 2-bit layers stay exact too.
    two = make_layer(rng, 256, 64, 2, 64)
    plan2 = gptq.prepare(two["qweight"], two["qzeros"], two["scales"], two["g_idx"], 2, "gptq")
    assert not int8_gemm.supports(plan2)
    np.testing.assert_allclose(gptq.gptq_matmul(plan2, many, "int8"), many @ two["W"], rtol=1e-4,
                               atol=1e-4 * np.abs(many @ two["W"]).max())
