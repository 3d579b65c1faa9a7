"""The in-place act-order kernels (kernels/generic/gptq_inplace.py, prepare(..., repack=False)) against the independent packer.

Expectations come from tests/gptq_packer.make_layer only: W built from known codes, scales and zeros.
"""

import numpy as np
import pytest

from gptq_packer import make_layer, quantize_config
from tinyllama_ref import quant
from tinyllama_ref.kernels import gptq, table
from tiers import RUNNABLE, below, needs

CASES = [dict(bits=4, group_size=128), dict(bits=4, group_size=32), dict(bits=3, group_size=128),
         dict(bits=3, group_size=32), dict(bits=4, group_size=32, sym=False),
         dict(bits=3, group_size=64, sym=False, checkpoint_format="gptq_v2"),
         dict(bits=2, group_size=32, sym=False), dict(bits=8, group_size=64, sym=False)]
ROWS = (1, 3, table.INPLACE_GEMV_MAX_ROWS, 64)      # GEMV once, a few rows, the most GEMV rows, tiles + BLAS


def _id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def _close(y, expected, rtol):
    """Agreement to rtol of the output's scale: float32 sums in another order, nothing more."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=rtol * scale)


def _plans(layer, bits, fmt="gptq"):
    args = (layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, fmt)
    return gptq.prepare(*args, repack=False), gptq.prepare(*args, repack=True)


def _check(layer, bits, fmt, rng, rows=ROWS):
    inplace, repacked = _plans(layer, bits, fmt)
    assert inplace.layout == "inplace" and not inplace.repacked
    assert np.shares_memory(inplace.qw, layer["qweight"]) and inplace.qw.shape == layer["qweight"].shape
    assert repacked.repacked                               # the comparison really is against the other layout
    for n_rows in rows:
        x = rng.normal(size=(n_rows, layer["W"].shape[0])).astype(np.float32)      # [N, in]
        y = gptq.gptq_matmul(inplace, x)
        _close(y, x @ layer["W"], 1e-4)
        _close(y, gptq.gptq_matmul(repacked, x), 1e-5)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_inplace_matches_w_and_repacked(case):
    rng = np.random.default_rng(31)
    layer = make_layer(rng, 512, 160, act_order=True, **case)
    _check(layer, case["bits"], case.get("checkpoint_format", "gptq"), rng)


@pytest.mark.parametrize("bits", [4, 3])
def test_arbitrary_non_monotonic_g_idx(bits):
    """Any g_idx: uneven, unaligned groups, one group empty, neighbours in unrelated groups."""
    rng = np.random.default_rng(40 + bits)
    g_idx = rng.integers(0, 8, size=256).astype(np.int32)
    g_idx[g_idx == 6] = 7                                    # group 6 holds no input at all
    layer = make_layer(rng, 256, 96, bits, 32, sym=False, g_idx=g_idx)
    assert np.any(np.diff(g_idx) < 0)
    _check(layer, bits, "gptq", rng)


@pytest.mark.parametrize("n_in,n_out,bits,group_size", [
    (200, 40, 4, 64),     # last group short
    (96, 33, 3, 64),      # out not a multiple of 32
    (80, 24, 3, 32),      # 3-bit inputs not a multiple of 32: the last unit lacks a word (tail loop)
    (72, 8, 4, 32),       # fewer columns than one vector
    (1000, 70, 3, 128),   # 3-bit tail of 8 inputs, several blocks of columns
])
def test_odd_shapes(n_in, n_out, bits, group_size):
    rng = np.random.default_rng(n_in * 7 + n_out)
    layer = make_layer(rng, n_in, n_out, bits, group_size, act_order=True, sym=False)
    _check(layer, bits, "gptq", rng)


def test_many_column_blocks(monkeypatch):
    """Narrow blocks (a small scale budget) give many prange tasks and a partial last block."""
    monkeypatch.setattr(gptq, "INPLACE_SCALE_BYTES", 1)    # floor of 64 columns per block
    rng = np.random.default_rng(77)
    layer = make_layer(rng, 256, 300, 4, 32, act_order=True, sym=False)
    assert gptq.inplace_block(300, 8) == 64
    _check(layer, 4, "gptq", rng, rows=(1, 5))


def test_prefill_tiles_many_slabs(monkeypatch):
    monkeypatch.setattr(gptq, "TILE_FLOATS", 64 * 300)    # 64-column slabs: 160 columns = 3 slabs, one partial
    rng = np.random.default_rng(78)
    layer = make_layer(rng, 256, 160, 3, 32, act_order=True, sym=False)
    _check(layer, 3, "gptq", rng, rows=(table.INPLACE_GEMV_MAX_ROWS + 1, 40))


def test_plan_keeps_no_copy_of_the_weights():
    rng = np.random.default_rng(3)
    layer = make_layer(rng, 512, 96, 4, 128, act_order=True)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq",
                        repack=False)
    assert np.shares_memory(plan.qw, layer["qweight"]) and np.shares_memory(plan.scales, layer["scales"])
    assert plan.const_zero == 8
    small = sum(v.nbytes for v in vars(plan).values() if isinstance(v, np.ndarray)
                and not np.shares_memory(v, layer["qweight"]) and not np.shares_memory(v, layer["scales"]))
    assert small <= layer["qzeros"].nbytes + 8 * 512        # qzeros (already contiguous) and g_idx only
    # A layer that needs no repack gets the same zero-copy segment plan either way.
    plain = make_layer(rng, 256, 64, 4, 32)
    for repack in (True, False):
        p = gptq.prepare(plain["qweight"], plain["qzeros"], plain["scales"], plain["g_idx"], 4, "gptq",
                         repack=repack)
        assert p.layout == "segments" and not p.repacked and np.shares_memory(p.qw, plain["qweight"])


@pytest.mark.parametrize("repack", [True, False])
def test_gptq_linear_repack_flag(repack):
    rng = np.random.default_rng(12)
    layer = make_layer(rng, 256, 64, 3, 32, act_order=True, sym=False, bias=True)
    cfg = quant.parse_quant_config(quantize_config(3, 32, True, sym=False), "quantize_config.json")
    lin = quant.GPTQLinear(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], cfg, 256, 64,
                           bias=layer["bias"], backend="numba", name="l", tensor_names=["l.qweight", "l.scales"],
                           repack=repack)
    assert lin._plan.repacked == repack
    assert lin.copied_tensors == (["l.qweight"] if repack else [])
    for n_rows in (1, 12):
        x = rng.normal(size=(n_rows, 256)).astype(np.float32)
        _close(lin(x), x @ layer["W"] + layer["bias"].astype(np.float32), 1e-4)


def test_int8_mode_leaves_inplace_plans_exact():
    rng = np.random.default_rng(13)
    layer = make_layer(rng, 256, 64, 4, 32, act_order=True)
    plan, _ = _plans(layer, 4)
    x = rng.normal(size=(1, 256)).astype(np.float32)
    np.testing.assert_array_equal(gptq.gptq_matmul(plan, x, mode="int8"), gptq.gptq_matmul(plan, x))


@pytest.mark.parametrize("bits", [4, 3, 2, 8])
def test_a_row_gets_the_same_numbers_alone_and_in_a_batch(bits):
    """The codes are decoded once for all rows of a batch; each row's own sums must not change with it."""
    rng = np.random.default_rng(50 + bits)
    layer = make_layer(rng, 320, 72, bits, 32, act_order=True, sym=False)   # 72: a scalar column tail
    plan, _ = _plans(layer, bits)
    x = rng.normal(size=(table.INPLACE_GEMV_MAX_ROWS, 320)).astype(np.float32)
    batch = gptq.gptq_matmul(plan, x)
    for n in (0, 1, 5, len(x) - 1):
        np.testing.assert_array_equal(gptq.gptq_matmul(plan, x[n:n + 1]), batch[n:n + 1])
    np.testing.assert_array_equal(gptq.gptq_matmul(plan, x[2:7]), batch[2:7])


@pytest.mark.parametrize("bits", [4, 8])
def test_vector_and_scalar_columns_agree(monkeypatch, bits):
    """Columns past the last multiple of 16 of a block take the scalar loop: the same arithmetic, bit for bit.
    Blocks of 32 columns: in the 48-column layer columns 32..39 are vector lanes, in its 40-column slice they
    are the scalar tail."""
    monkeypatch.setattr(gptq, "inplace_block", lambda n_out, n_groups: 32)
    rng = np.random.default_rng(60 + bits)
    layer = make_layer(rng, 256, 48, bits, 32, act_order=True, sym=False)
    x = rng.normal(size=(3, 256)).astype(np.float32)
    full = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, "gptq",
                        repack=False)
    cut = gptq.prepare(np.ascontiguousarray(layer["qweight"][:, :40]),
                       np.ascontiguousarray(layer["qzeros"][:, :40 * bits // 32]),
                       np.ascontiguousarray(layer["scales"][:, :40]), layer["g_idx"], bits, "gptq", repack=False)
    np.testing.assert_array_equal(gptq.gptq_matmul(cut, x), gptq.gptq_matmul(full, x)[:, :40])


def test_inplace_gemv_sums_no_less_accurately_than_float32_matmul():
    """Against float64: the GEMV's error stays within a small multiple of a float32 matmul's (BLAS) on a
    deep layer, so the decode-once order and the flushed partial sums lose nothing worth seeing."""
    rng = np.random.default_rng(70)
    layer = make_layer(rng, 4096, 64, 4, 128, act_order=True)
    plan, _ = _plans(layer, 4)
    x = rng.normal(size=(4, 4096)).astype(np.float32)
    exact = x.astype(np.float64) @ layer["W"].astype(np.float64)
    blas = np.abs(x @ layer["W"].astype(np.float32) - exact).max()
    ours = np.abs(gptq.gptq_matmul(plan, x) - exact).max()
    assert ours <= 3 * blas, (ours, blas)
