"""The AMX prefill (kernels/amx/amx.py) against float64 products, the independent packer and the BLAS path.

AMX adds float32 products in its own order, so results are compared with a float64 product at float32's own
precision (a few units of 2**-24 of sum |x| |w|), the same check the BLAS path passes; the splits themselves
are exact, and that is asserted bit for bit. Skipped where the CPU or the kernel offers no AMX.
"""

import numpy as np
import pytest

from gptq_packer import make_layer
from tinyllama_ref.kernels.amx import amx, amx_codes
from tinyllama_ref.kernels import gptq, table
from tiers import RUNNABLE, below, needs

pytestmark = needs("amx")


def _bf16(bits16):
    """bfloat16 bit patterns (uint16 or the halves of uint32 lanes) -> float64."""
    return (np.asarray(bits16, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)


def _float32_close(y, x, w):
    """|y - x @ w| within 16 float32 rounding units of sum |x| |w|, computed in float64."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    bound = 16 * 2.0 ** -24 * (np.abs(x64) @ np.abs(w64)) + 1e-30
    err = np.abs(y.astype(np.float64) - x64 @ w64)
    assert np.all(err <= bound), f"worst {float((err / bound).max()):.2f} of the bound"


def test_x_split_is_exact():
    """hi + mid + lo == x for every float32 (signs, tiny and huge magnitudes, exact powers of two)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 70)) * 10.0 ** rng.integers(-30, 30, size=(37, 70))).astype(np.float32)
    x[0, :4] = [1.0, -2.0 ** -100, 3.0e38, 0.0]
    xs = amx.split_rows(x)
    assert xs.shape == (3, 4, 3, 16, 32)                   # rows padded to 64, inputs to 96
    rows = xs.transpose(0, 1, 3, 2, 4).reshape(3, 64, 96)  # [part, row tile, row, k tile, k] -> [part, row, k]
    total = _bf16(rows[0]) + _bf16(rows[1]) + _bf16(rows[2])
    np.testing.assert_array_equal(total[:37, :70], x.astype(np.float64))
    assert not rows[:, 37:].any() and not rows[:, :, 70:].any()            # padding is zero


def test_w_split_is_exact_for_gptq_weights():
    """Every s * (q - z) with an fp16 scale and |q - z| <= 15 is hi + lo exactly; pairs sit in one lane."""
    rng = np.random.default_rng(1)
    s = rng.uniform(-0.05, 0.05, size=(64, 32)).astype(np.float16).astype(np.float32)
    w = (s * rng.integers(-15, 16, size=(64, 32))).astype(np.float32)                  # [64, 32]
    bv = np.zeros((2, 32, 32), dtype=np.uint32)
    amx.split_w(w, 64, 32, 0, 64, bv)
    lanes = [(bv[part] & 0xFFFF, bv[part] >> 16) for part in range(2)]               # (row 2p, row 2p + 1)
    even = _bf16(lanes[0][0]) + _bf16(lanes[1][0])
    odd = _bf16(lanes[0][1]) + _bf16(lanes[1][1])
    np.testing.assert_array_equal(even, w[0::2].astype(np.float64))
    np.testing.assert_array_equal(odd, w[1::2].astype(np.float64))


CASES = [dict(bits=4, group_size=128, act_order=True), dict(bits=4, group_size=-1),
         dict(bits=3, group_size=32, act_order=True, sym=False), dict(bits=3, group_size=128),
         dict(bits=4, group_size=64, checkpoint_format="gptq_v2", sym=False),
         dict(bits=2, group_size=32, sym=False, act_order=True)]


@pytest.mark.parametrize("repack", [True, False], ids=["segments", "inplace"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gptq_prefill_on_tiles(case, repack):
    """gptq_matmul's many-row path (which takes AMX here) against x @ W from the independent packer, for
    both plan layouts; 1100 inputs cross a KC block and 160 columns make a full and a partial slab."""
    rng = np.random.default_rng(7)
    layer = make_layer(rng, 1100 if case["bits"] != 3 else 1088, 160, **case)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], case["bits"],
                        case.get("checkpoint_format", "gptq"), repack=repack)
    for n_rows in (table.GEMV_MAX_ROWS + 1, 64):
        x = rng.standard_normal((n_rows, layer["W"].shape[0])).astype(np.float32)
        _float32_close(gptq.gptq_matmul(plan, x), x, layer["W"])


def test_odd_inputs_inplace():
    """An "inplace" layer with an odd number of inputs: the last one is paired with a zero."""
    rng = np.random.default_rng(8)
    layer = make_layer(rng, 203, 64, 4, 64, act_order=True, sym=False)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq",
                        repack=False)
    x = rng.standard_normal((40, 203)).astype(np.float32)
    _float32_close(gptq.gptq_matmul(plan, x), x, layer["W"])


@pytest.mark.parametrize("bits,repack,kernel", [(4, True, "product_codes"), (3, True, "product_segments"),
                                                (4, False, "product_gathered"), (3, False, "product_inplace")])
def test_tiles_are_used_and_agree_with_blas(monkeypatch, bits, repack, kernel):
    """The same prefill with AMX and with the BLAS slabs: both within float32 round-off of x @ W. 4-bit layers
    take the code tiles (amx_codes.py: in place or gathered into group order), 3-bit ones the split
    dequantized slabs (amx.py)."""
    rng = np.random.default_rng(9)
    layer = make_layer(rng, 512, 96, bits, 128, act_order=True)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, "gptq",
                        repack=repack)
    x = rng.standard_normal((48, 512)).astype(np.float32)
    calls = []
    module = amx_codes if kernel in ("product_codes", "product_gathered") else amx
    real = getattr(module, kernel)
    monkeypatch.setattr(module, kernel, lambda *a: calls.append(1) or real(*a))
    on_tiles = gptq.gptq_matmul(plan, x)
    assert calls, f"{kernel} was not called"
    on_blas = gptq.run("blas_slabs" if repack else "blas_slabs_inplace", plan, x)
    _float32_close(on_tiles, x, layer["W"])
    _float32_close(on_blas, x, layer["W"])


@pytest.mark.parametrize("repack", [True, False], ids=["repacked", "gathered"])
@pytest.mark.parametrize("n_rows", [7, 33, 64, 100])
def test_code_tiles_uneven_groups_asymmetric(n_rows, repack):
    """amx_codes on a layer whose groups are uneven (padded to 32 inputs, one empty), asymmetric zeros that
    vary by group and column, and row counts that leave partial 32-row blocks; repacked, or read in place with
    the codes gathered into group order."""
    rng = np.random.default_rng(n_rows)
    g_idx = rng.integers(0, 5, size=640).astype(np.int32)
    g_idx[g_idx == 3] = 4                                   # group 3 holds no input
    layer = make_layer(rng, 640, 192, 4, 128, sym=False, g_idx=g_idx)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq",
                        repack=repack)
    assert amx_codes.supports(plan) == repack and plan.const_zero < 0
    x = rng.standard_normal((n_rows, 640)).astype(np.float32)
    _float32_close(gptq.gptq_matmul(plan, x), x, layer["W"])


def test_code_tile_rows_are_the_codes():
    """The table lookup turns a packed word into the pairs (q0, q4), (q1, q5), (q2, q6), (q3, q7) as bfloat16:
    checked on the table itself (entry i is i mod 16) and through the pair order split_x_paired gives x."""
    assert [float(v) for v in _bf16(amx_codes.TABLE)] == [float(i % 16) for i in range(32)]
    x = np.arange(64, dtype=np.float32)[None, :] + 1.0                     # x[k] = k + 1: exact in bfloat16
    xs = np.zeros((3, 2, 2, 16, 32), dtype=np.uint16)
    sumx = np.empty((1, 1), dtype=np.float32)
    amx_codes.split_x_paired(x, np.array([0, 8]), xs, sumx)
    order = _bf16(xs[0, 0, 0, 0]) - 1.0                                     # the input at each tile position
    pairs = [(8 * (r // 4) + r % 4, 8 * (r // 4) + r % 4 + 4) for r in range(16)]
    assert [tuple(order[2 * r:2 * r + 2].astype(int)) for r in range(16)] == pairs
    assert sumx[0, 0] == np.float32(x.sum())


def test_eight_bit_layers_stay_on_blas():
    """8-bit weights need 19 significant bits, more than two bfloat16s hold: not served by the tiles."""
    assert not amx.supports(4096, 8) and amx.supports(4096, 4) and not amx.supports(4100, 4)


def test_stacked_parts_are_rows_of_their_own():
    """stack_parts: row p n + r of the tile pair is part p of x's row r (so the three rows add up to x exactly),
    in the same column order; rows past 3 n are zero."""
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((7, 96)) * 10.0 ** rng.integers(-8, 8, size=(7, 96))).astype(np.float32)
    stacked = amx_codes.stack_parts(amx.split_rows(x), 7)
    assert stacked.shape == (1, 2, 3, 16, 32)
    rows = stacked[0].transpose(0, 2, 1, 3).reshape(32, 96)                 # [tile, k tile, row, k] -> [row, k]
    total = _bf16(rows[0:7]) + _bf16(rows[7:14]) + _bf16(rows[14:21])
    np.testing.assert_array_equal(total, x.astype(np.float64))
    assert not rows[21:].any()


@pytest.mark.parametrize("repack", [True, False], ids=["codes", "gathered"])
@pytest.mark.parametrize("n_rows", [1, 2, 5, 8, 10, 11])
def test_few_rows_on_code_tiles(monkeypatch, n_rows, repack):
    """A decode batch on the code tiles: up to 10 rows x's three parts are stacked as rows of one tile pair
    (one product per step), 11 rows take the three-part products. Every row count is sent to the tiles here,
    whatever the routing thresholds, and checked against x @ W of the independent packer (asymmetric zeros,
    act-order)."""
    stacked = []
    real = amx_codes.stack_parts
    monkeypatch.setattr(amx_codes, "stack_parts", lambda xs, n: stacked.append(n) or real(xs, n))
    rng = np.random.default_rng(100 + n_rows)
    layer = make_layer(rng, 384, 96, 4, 64, act_order=True, sym=False)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq",
                        repack=repack)
    x = rng.standard_normal((n_rows, 384)).astype(np.float32)
    _float32_close(gptq.run("amx_codes" if repack else "amx_gathered", plan, x), x, layer["W"])
    assert stacked == ([n_rows] if 3 * n_rows <= amx_codes.STACKED_ROWS else [])


@pytest.mark.parametrize("repack", [True, False], ids=["codes", "gathered"])
@pytest.mark.parametrize("n_rows", [8, 40])
def test_code_tiles_over_several_slabs(n_rows, repack):
    """More columns than one thread task (amx_codes.SLAB): a whole slab and a partial one, on both code-tile
    paths, against x @ W of the independent packer."""
    rng = np.random.default_rng(200 + n_rows)
    n_out = amx_codes.SLAB + 96
    layer = make_layer(rng, 256, n_out, 4, 64, act_order=True)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq",
                        repack=repack)
    x = rng.standard_normal((n_rows, 256)).astype(np.float32)
    _float32_close(gptq.gptq_matmul(plan, x), x, layer["W"])


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("n_rows", [8, 40])
def test_code_tiles_long_group(n_rows, sym):
    """One group of 1024 inputs (group_size -1): a single segment of 32 steps on the code tiles, whose zero
    term enters the fold once."""
    rng = np.random.default_rng(300 + n_rows)
    layer = make_layer(rng, 1024, 96, 4, -1, sym=sym)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq")
    assert amx_codes.supports(plan)
    x = rng.standard_normal((n_rows, 1024)).astype(np.float32)
    _float32_close(gptq.gptq_matmul(plan, x), x, layer["W"])
