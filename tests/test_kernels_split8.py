"""Exact decode on VNNI (kernels/vnni/split8.py): activations split into four int8 pieces, integer dot products.

The split is checked against its definition (pieces rebuild x, scales are the smallest powers of two), the
kernel against a NumPy statement of the same integer arithmetic (bit for bit) and against x @ W of the
independent packer (float32 round-off), on the layer shapes GPTQ checkpoints have."""

import numpy as np
import pytest

from gptq_packer import make_layer
from tinyllama_ref.kernels import gptq, table
from tiers import RUNNABLE, below, needs
from tinyllama_ref.kernels.vnni import int8, split8

needs_vnni = needs("vnni")


def _wide(rng, shape):
    """float32 values over many binades, so that blocks mix large and tiny inputs."""
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6, size=shape)).astype(np.float32)


def _special_blocks():
    x = np.zeros((1, 8 * 32), dtype=np.float32)                             # block 0: all zeros
    x[0, 32:64] = 127.0 * 2.0 ** 5                                          # max exactly 127 * 2^e
    x[0, 33] = -1.0
    x[0, 64:96] = 2.0 ** np.arange(-10, 22)                                 # every power of two
    x[0, 96:128] = 1e-38                                                    # near the smallest normal
    x[0, 128:160] = np.linspace(-3.0e38, 3.0e38, 32)                        # near the largest float32
    x[0, 160:192] = np.float32(2.0 ** -140)                                 # subnormal
    x[0, 192:224] = np.float32(1.0) + np.float32(2.0 ** -23) * np.arange(32)
    x[0, 224:256] = -0.5
    return x


@pytest.mark.parametrize("source", ["wide", "special"])
def test_pieces_rebuild_x_within_the_last_scale(source):
    x = _wide(np.random.default_rng(0), (3, 320)) if source == "wide" else _special_blocks()
    pieces, s0 = split8.split_activations(x)
    n, blocks = s0.shape
    top = np.abs(x.astype(np.float64)).reshape(n, blocks, 32).max(axis=2)
    s0 = s0.astype(np.float64)
    mantissa, _ = np.frexp(s0)
    assert np.all(mantissa == 0.5)                                          # powers of two
    assert np.all(top <= 127.0 * s0)
    assert np.all((top > 63.5 * s0) | (s0 == 2.0 ** split8.MIN_EXPONENT))   # the smallest such power
    assert np.abs(pieces[:, :, 0]).max() <= 127 and np.abs(pieces[:, :, 1:]).max() <= 64
    scales = s0[:, :, None] / 128.0 ** np.arange(4)[None, None, :]          # [N, B, 4]
    rebuilt = (pieces.astype(np.float64) * scales[..., None]).sum(axis=2).reshape(x.shape)
    x64 = x.astype(np.float64)
    s0_per_input = np.repeat(s0, 32, axis=1)
    assert np.all(np.abs(rebuilt - x64) <= s0_per_input * 2.0 ** -22)
    exact = np.abs(x64) >= 4 * s0_per_input                                 # 24 bits fit above s0 / 2^21
    np.testing.assert_array_equal(rebuilt[exact], x64[exact])
    assert exact.sum() >= 30                                                # not vacuous


def _codes_layer(rng, n_in, n_out):
    """qweight of random 4-bit codes packed as the format says (nibble k of word r = input 8r + k), unit
    scales, zeros of 0 (gptq_v2 stores true zeros): then y is the kernel's accumulator, nothing folded in."""
    codes = rng.integers(0, 16, size=(n_in, n_out), dtype=np.uint64)        # [in, out]
    words = np.zeros((n_in // 8, n_out), dtype=np.uint64)
    for k in range(8):
        words |= codes[k::8] << np.uint64(4 * k)
    qzeros = np.zeros((1, -(-n_out // 8)), dtype=np.int32)
    scales = np.ones((1, n_out), dtype=np.float16)
    plan = gptq.prepare(words.astype(np.uint32).view(np.int32), qzeros, scales, np.zeros(n_in, dtype=np.int64),
                        4, "gptq_v2")
    return codes.astype(np.int64), plan


@needs_vnni
@pytest.mark.parametrize("n_in,n_out", [(256, 48), (512, 77), (96, 16)])
def test_kernel_is_the_integer_arithmetic(n_in, n_out):
    """Per block: four exact integer dot products, paired as 128 t0 + t1 and 128 t2 + t3, each converted and
    scaled, summed, added to the accumulator: every float32 step repeated in NumPy, compared for equality."""
    rng = np.random.default_rng(n_in + n_out)
    codes, plan = _codes_layer(rng, n_in, n_out)
    assert plan.const_zero == 0 and len(plan.seg_group) == 1
    x = _wide(rng, (5, n_in))                                               # rows share each weight load
    pieces, s0 = split8.split_activations(x)                               # [N, B, 4, 32], [N, B]
    y = split8.gptq_matmul_split(plan, x, 32)
    expected = np.zeros((5, n_out), dtype=np.float32)
    for n in range(5):
        for b in range(n_in // 32):
            t = pieces[n, b].astype(np.int64) @ codes[32 * b:32 * b + 32]   # [4, out] exact
            hi = (128 * t[0] + t[1]).astype(np.float32)                     # exact: below 2^24
            lo = (128 * t[2] + t[3]).astype(np.float32)
            s1, s3 = np.float32(s0[n, b] / 2.0 ** 7), np.float32(s0[n, b] / 2.0 ** 21)
            expected[n] = expected[n] + (hi * s1 + lo * s3)
    np.testing.assert_array_equal(y, expected)


def _within_bound(y, x, w):
    """|y - x @ w| within 16 float32 rounding units of sum |x| |w| plus the split's loss: per block b of 32
    inputs, 2^-28 max|x_b| sum_{i in b} |w_ij|, all in float64."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    top = np.abs(x64).reshape(x.shape[0], -1, 32).max(axis=2)             # [N, B]
    w_blocks = np.abs(w64).reshape(-1, 32, w.shape[1]).sum(axis=1)        # [B, out]
    bound = 16 * 2.0 ** -24 * (np.abs(x64) @ np.abs(w64)) + 2.0 ** -28 * (top @ w_blocks) + 1e-30
    err = np.abs(y.astype(np.float64) - x64 @ w64)
    assert np.all(err <= bound), f"worst {float((err / bound).max()):.2f} of the bound"


@needs_vnni
@pytest.mark.parametrize("n_in,n_out,group_size,act_order,sym", [
    (256, 96, 32, True, False), (256, 40, -1, False, False), (512, 77, 128, True, True),
    (384, 64, 64, False, False), (4096, 48, 128, True, False)])
def test_decode_rows_take_the_split_and_match_x_at_w(monkeypatch, n_in, n_out, group_size, act_order, sym):
    """gptq_matmul sends decode rows of 4-bit layers to the split on VNNI CPUs; the result is x @ W of the
    independent packer to float32 round-off (repacked act-order layers, odd widths, every group layout)."""
    calls = []
    real = split8.gptq_matmul_split
    monkeypatch.setattr(split8, "gptq_matmul_split", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    rng = np.random.default_rng(n_in * 7 + n_out)
    layer = make_layer(rng, n_in, n_out, 4, group_size, act_order=act_order, sym=sym)
    # the tier named: on Zen 4 a repacked layer would otherwise take the avx2 tier's kernels (repacked_tier)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq",
                        tier="vnni")
    for n_rows in (1, 2, 3):
        x = _wide(rng, (n_rows, n_in))
        _within_bound(gptq.gptq_matmul(plan, x), x, layer["W"])
        x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
        y = gptq.gptq_matmul(plan, x)
        _within_bound(y, x, layer["W"])
    assert calls == [1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("segment_blocks", [1, 3, 8])
def test_split_rows_lays_out_the_numpy_split(segment_blocks):
    """The compiled split (split_rows, the kernel's layout: even inputs of each 8 first) holds exactly the
    pieces and scales of split_activations, the NumPy statement; sumx is the sum of x - r per segment
    (float64 reference, within float32 summation error of sum |x|). Blocks with a NaN or an infinity carry
    zero pieces and NaN scales."""
    rng = np.random.default_rng(segment_blocks)
    x = np.concatenate([_wide(rng, (2, 8 * 32)), _special_blocks()])        # [3, 256]
    x[1, 70] = np.inf
    x[1, 200] = np.nan
    n_rows, n_blocks = x.shape[0], x.shape[1] // 32
    seg_start = np.append(np.arange(0, n_blocks, segment_blocks), n_blocks).astype(np.int64) * 4
    xw = np.empty((n_blocks, n_rows, 4, 8), dtype=np.int32)
    xs = np.empty((n_blocks, n_rows, 2), dtype=np.float32)
    sumx = np.empty((n_rows, len(seg_start) - 1), dtype=np.float32)
    split8.split_rows(x, seg_start, xw, xs, sumx)
    pieces, s0 = split8.split_activations(np.nan_to_num(x, nan=0.0, posinf=0.0))   # finite blocks only
    bad = ~np.isfinite(x.reshape(n_rows, n_blocks, 32)).all(axis=2)           # [N, B]
    order = np.array([0, 2, 4, 6, 1, 3, 5, 7])                                # input of each byte in a 4-byte group
    laid = xw.view(np.int8).reshape(n_blocks, n_rows, 4, 4, 8)                # [B, N, piece, word, byte]
    got = np.empty_like(laid)
    got[..., order] = laid                                                    # back to input order
    got = got.reshape(n_blocks, n_rows, 4, 32).transpose(1, 0, 2, 3)          # [N, B, 4, 32]
    assert np.array_equal(got[~bad], pieces[~bad]) and not got[bad].any()
    np.testing.assert_array_equal(xs[:, :, 0].T[~bad], (s0 / 2.0 ** 7)[~bad])
    np.testing.assert_array_equal(xs[:, :, 1].T[~bad], (s0 / 2.0 ** 21)[~bad])
    assert np.isnan(xs.transpose(1, 0, 2)[bad]).all()
    split = (pieces.astype(np.float64) * (s0[..., None] / 128.0 ** np.arange(4))[..., None]).sum(axis=2)
    for n in range(n_rows):
        for s in range(len(seg_start) - 1):
            b0, b1 = seg_start[s] // 4, seg_start[s + 1] // 4
            block = x[n, 32 * b0:32 * b1].astype(np.float64)
            if bad[n, b0:b1].any():
                assert np.isnan(sumx[n, s])
                continue
            if np.abs(block).sum() > 1e38:             # partial sums past float32's range: any order overflows
                continue
            assert abs(sumx[n, s] - split[n, b0:b1].sum()) <= 2.0 ** -20 * np.abs(block).sum() + 1e-44


@needs_vnni
def test_non_finite_inputs_give_nan_rows_and_zeros_give_zeros():
    rng = np.random.default_rng(5)
    layer = make_layer(rng, 256, 48, 4, 64, act_order=False, sym=False)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq")
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[0, 100] = np.nan
    x[1, 7] = np.inf
    x[2] = 0.0
    y = split8.gptq_matmul_split(plan, gptq.permute_x(plan, x), 32)
    assert np.isnan(y[0]).all() and np.isnan(y[1]).all()
    np.testing.assert_array_equal(y[2], np.zeros(48, dtype=np.float32))


def test_three_bit_and_inplace_layers_are_not_split():
    rng = np.random.default_rng(6)
    three = make_layer(rng, 256, 32, 3, 32, act_order=False)
    four = make_layer(rng, 256, 32, 4, 32, act_order=True)
    assert not split8.supports(gptq.prepare(three["qweight"], three["qzeros"], three["scales"], three["g_idx"],
                                            3, "gptq"))
    assert not split8.supports(gptq.prepare(four["qweight"], four["qzeros"], four["scales"], four["g_idx"], 4,
                                            "gptq", repack=False))
    assert split8.supports(gptq.prepare(four["qweight"], four["qzeros"], four["scales"], four["g_idx"], 4, "gptq"))


@pytest.mark.parametrize("tier", ["generic"])
def test_a_tier_without_split8_decodes_on_the_float_gemv(monkeypatch, tier):
    """A layer prepared for the generic tier (load(cpu="generic")), which has no integer dot products: the table
    sends decode rows to the float GEMV, which agrees with the same bound."""
    monkeypatch.setattr(split8, "gptq_matmul_split", lambda *a: pytest.fail("split ran"))
    rng = np.random.default_rng(8)
    layer = make_layer(rng, 256, 48, 4, 64, act_order=True, sym=False)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq", tier=tier)
    assert split8.supports(plan) and table.choose(table.layer_of(plan), 1, "exact", tier) == "gemv"
    x = rng.standard_normal((1, 256)).astype(np.float32)
    _within_bound(gptq.gptq_matmul(plan, x), x, layer["W"])
