"""The register tiles of kernels/avx512/gptq_tiles.py (many-row products without AMX) against the independent packer.

Expectations come from tests/gptq_packer.make_layer (W built from known codes, scales and zeros) and from float64
products; the tiles are called directly, so these tests run whatever the CPU (on AMX machines gptq_matmul prefers
the AMX tiles).
"""

import numpy as np
import pytest

from gptq_packer import make_layer, pack_stream_columns, pack_stream_rows
from tinyllama_ref.kernels import gptq, table
from tiers import RUNNABLE, below, needs
from tinyllama_ref.kernels.avx512 import gptq_tiles

CASES = [dict(bits=4, group_size=128), dict(bits=4, group_size=32, sym=False),
         dict(bits=3, group_size=128), dict(bits=3, group_size=64, sym=False, checkpoint_format="gptq_v2"),
         dict(bits=4, group_size=-1), dict(bits=4, group_size=64, act_order=True),
         dict(bits=3, group_size=32, act_order=True, sym=False)]


def _id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def _plan(layer, bits, fmt="gptq", repack=True):
    return gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, fmt,
                        repack=repack)


def _close(y, x, w):
    """Within float32 round-off of the exact product: the error bound of a float32 dot product whose terms are
    added at most ~128 + in/128 deep, against the float64 result."""
    exact = x.astype(np.float64) @ w.astype(np.float64)                     # [N, out]
    bound = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)     # [N, out]
    depth = 128 + w.shape[0] / 128
    assert np.all(np.abs(y - exact) <= depth * 2.0 ** -24 * bound + 1e-30)


# In-place plans exist only for act-order layers of several groups.
LAYOUTS = [(case, True) for case in CASES] + [(dict(case, act_order=True), False) for case in CASES
                                              if case["group_size"] != -1]


@pytest.mark.parametrize("case,repack", LAYOUTS, ids=[_id(c) + ("-segments" if r else "-inplace") for c, r in LAYOUTS])
def test_tiles_match_the_packed_weights(case, repack):
    rng = np.random.default_rng(11)
    case = dict(case)
    bits, fmt = case["bits"], case.pop("checkpoint_format", "gptq")
    layer = make_layer(rng, 384, 96, checkpoint_format=fmt, **case)
    plan = _plan(layer, bits, fmt, repack)
    assert plan.layout == ("segments" if repack else "inplace")
    assert gptq_tiles.supports(plan)
    for n_rows in (1, 4, 5, 12, 16, 17, 40, 64):     # tiles of 4, 8, 12 and mixes of them
        x = rng.normal(size=(n_rows, 384)).astype(np.float32)
        y = gptq._tiles_matmul(plan, x)
        assert y.shape == (n_rows, 96) and y.dtype == np.float32
        _close(y, x, layer["W"])


@pytest.mark.parametrize("n_in,n_out,bits,group_size,act_order", [
    (200, 40, 4, 64, False),    # last group short, 8 columns past the tile
    (96, 33, 3, 64, True),               # one column past the tile, act-order
    (64, 8, 4, 32, True),                # fewer columns than a tile: all scalar
    (1024, 70, 3, 128, False),           # several chunks of inputs
])
@pytest.mark.parametrize("repack", [True, False], ids=["segments", "inplace"])
def test_odd_shapes(n_in, n_out, bits, group_size, act_order, repack):
    rng = np.random.default_rng(n_in + n_out)
    layer = make_layer(rng, n_in, n_out, bits, group_size, act_order=act_order, sym=False)
    plan = _plan(layer, bits, repack=repack)
    x = rng.normal(size=(37, n_in)).astype(np.float32)
    _close(gptq._tiles_matmul(plan, x), x, layer["W"])


@pytest.mark.parametrize("repack", [True, False], ids=["segments", "inplace"])
def test_narrow_slabs(monkeypatch, repack):
    """Many slabs, a partial last one, across threads."""
    monkeypatch.setattr(gptq_tiles, "slab_columns", lambda n_out, n_rows, threads: 64)
    rng = np.random.default_rng(5)
    layer = make_layer(rng, 256, 200, 4, 32, act_order=True, sym=False)
    x = rng.normal(size=(45, 256)).astype(np.float32)
    _close(gptq._tiles_matmul(_plan(layer, 4, repack=repack), x), x, layer["W"])


@pytest.mark.parametrize("repack", [True, False], ids=["segments", "inplace"])
def test_a_row_gets_the_same_numbers_in_any_tile(repack):
    """Tiles of 4, 8 and 12 rows do each row's arithmetic in the same order: a row's numbers do not depend on
    the other rows or on which tile it lands in."""
    rng = np.random.default_rng(21)
    layer = make_layer(rng, 256, 64, 4, 64, act_order=True, sym=False)
    plan = _plan(layer, 4, repack=repack)
    x = rng.normal(size=(40, 256)).astype(np.float32)                        # tiles 12, 12, 8, 8
    batch = gptq._tiles_matmul(plan, x)
    for lo, hi in ((0, 1), (3, 8), (30, 40), (7, 19)):
        np.testing.assert_array_equal(gptq._tiles_matmul(plan, x[lo:hi]), batch[lo:hi])


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("repack", [True, False], ids=["segments", "inplace"])
def test_vector_and_scalar_columns_agree(bits, repack):
    """Columns past the last multiple of 32 take a scalar loop with the same arithmetic, bit for bit: the same
    codes with the columns rotated by 8 put columns 32..39 into vector lanes and 0..7 into the scalar loop."""
    rng = np.random.default_rng(30 + bits)
    n_in, n_out = 256, 40
    layer = make_layer(rng, n_in, n_out, bits, 64, act_order=True, sym=False)
    order = np.r_[8:40, 0:8]
    rotated = dict(qweight=pack_stream_columns(layer["codes"][:, order], bits),
                   qzeros=pack_stream_rows(layer["stored_zeros"][:, order], bits),
                   scales=np.ascontiguousarray(layer["scales"][:, order]), g_idx=layer["g_idx"])
    x = rng.normal(size=(13, n_in)).astype(np.float32)
    y = gptq._tiles_matmul(_plan(layer, bits, repack=repack), x)
    y_rotated = gptq._tiles_matmul(_plan(rotated, bits, repack=repack), x)
    np.testing.assert_array_equal(y_rotated, y[:, order])


def test_sums_no_less_accurately_than_float32_matmul():
    """Against float64 on a deep layer: the tiles' error stays within a small multiple of a float32 matmul's."""
    rng = np.random.default_rng(70)
    layer = make_layer(rng, 4096, 64, 4, 128, act_order=True)
    x = rng.normal(size=(40, 4096)).astype(np.float32)
    exact = x.astype(np.float64) @ layer["W"].astype(np.float64)
    blas = np.abs(x @ layer["W"].astype(np.float32) - exact).max()
    for repack in (True, False):
        ours = np.abs(gptq._tiles_matmul(_plan(layer, 4, repack=repack), x) - exact).max()
        assert ours <= 3 * blas, (repack, ours, blas)


def test_row_tiles_cover_the_rows():
    """Hand-counted: 64 rows are four tiles of 12 and two of 8; a remainder above 4 gets one tile of 8 or 12."""
    assert gptq_tiles.row_tiles(64) == [12, 12, 12, 12, 8, 8]
    assert gptq_tiles.row_tiles(33) == [12, 12, 12]
    assert gptq_tiles.row_tiles(3) == [4]
    assert gptq_tiles.row_tiles(20) == [12, 8]
    for n in range(1, 200):
        tiles = gptq_tiles.row_tiles(n)
        assert set(tiles) <= set(gptq_tiles.TILE_ROWS) and n <= sum(tiles) < n + 12


@needs("avx512")
def test_matmul_takes_the_tiles_for_many_rows():
    """At the avx512 and vnni tiers the table sends many-row exact products to the 12 x 32 tiles, and the
    slabs + BLAS they replace give the same result to float32 round-off."""
    rng = np.random.default_rng(9)
    layer = make_layer(rng, 256, 96, 4, 64, act_order=True)
    x = rng.normal(size=(table.GEMV_MAX_ROWS + 9, 256)).astype(np.float32)
    for tier in [t for t in RUNNABLE if t in ("avx512", "vnni")]:
        for repack in (True, False):
            plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq",
                                repack=repack, tier=tier)
            name = table.choose(table.layer_of(plan), len(x), "exact", tier)
            assert name == ("tiles" if repack else "tiles_inplace")
            y = gptq.gptq_matmul(plan, x)
            _close(y, x, layer["W"])
            slabs = gptq.run("blas_slabs" if repack else "blas_slabs_inplace", plan, x)
            np.testing.assert_allclose(slabs, y, rtol=1e-5, atol=1e-5 * np.abs(y).max())
