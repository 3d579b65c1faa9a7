"""Column strips (kernels/generic/strips.py): a repacked 4-bit layer on the tiers of table.STRIP_TIERS is stored
strip by strip, and every kernel the table names for it reads that layout.

Checked three ways: the stored words against the NumPy statement (to_strips of the row-major repack of the same
layer); every kernel the table can choose for a strips layer (decode and prefill, exact and int8, each row range)
against the same kernel on the row-major plan of the same layer, bit for bit (the arithmetic is the same, only the
addresses differ); and the exact kernels against x @ W in float64 from the independent packer."""

import numpy as np
import pytest

from gptq_packer import make_layer
from tiers import needs
from tinyllama_ref.kernels import gptq, table
from tinyllama_ref.kernels.generic import strips

pytestmark = needs("avx2")

# (inputs, outputs, group size, sym): outputs a multiple of 32 (strip_width), one or many groups, asymmetric zeros;
# 33 strips of 32: many blocks of the guided schedule (generic/tasks.py), the last ones a single strip; in
# exact mode 64 and 576 columns are strips of 64 (one and nine), the others of 32
LAYERS = [(256, 96, 32, False), (384, 64, 128, True), (512, 160, 64, False), (256, 1056, 128, False),
          (384, 576, 128, False)]
# every row range of the strips rows of the table, both ends
ROWS = (1, 2, 5, 8, 9, 16, 23, 24, 32, 33, 40, table.INT8_STRIPS_GEMV_MAX_ROWS, table.INT8_STRIPS_GEMV_MAX_ROWS + 1)


def _plans(n_in, n_out, group_size, sym, seed, mode="exact"):
    """The same layer prepared in strips (as a model of this gptq mode stores it) and row-major."""
    rng = np.random.default_rng(seed)
    layer = make_layer(rng, n_in, n_out, 4, group_size, act_order=True, sym=sym)
    args = (layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq")
    in_strips = gptq.prepare(*args, tier="avx2", mode=mode)
    row_major = gptq.prepare(*args, tier="avx2", strips_ok=False)
    return rng, layer, in_strips, row_major


@pytest.mark.parametrize("plan_mode", ["exact", "int8"])
@pytest.mark.parametrize("n_in,n_out,group_size,sym", LAYERS)
def test_strips_hold_the_row_major_words_strip_by_strip(n_in, n_out, group_size, sym, plan_mode):
    _, _, in_strips, row_major = _plans(n_in, n_out, group_size, sym, 1, plan_mode)
    width = 64 if plan_mode == "exact" and n_out % 64 == 0 else 32
    assert in_strips.strip == width == table.strip_width("avx2", 4, n_out, plan_mode) and row_major.strip == n_out
    one_strip = width == n_out                                # one strip is the row-major layout
    assert table.layer_of(in_strips).layout == ("segments" if one_strip else "strips")
    assert table.layer_of(row_major).layout == "segments"
    assert in_strips.n_packed == row_major.n_packed == row_major.qw.shape[0]
    np.testing.assert_array_equal(in_strips.qw, strips.to_strips(row_major.qw, width))


@pytest.mark.parametrize("plan_mode", ["exact", "int8"])
@pytest.mark.parametrize("mode", ["exact", "int8"])
@pytest.mark.parametrize("n_in,n_out,group_size,sym", LAYERS)
def test_every_kernel_gives_the_row_major_bits(n_in, n_out, group_size, sym, mode, plan_mode):
    """Each mode's kernels on strips of its own width and of the other mode's (an int8 layer's exact
    fallbacks, and the int8 kernels on 64-column strips). The kernel the table names for the strips is run on
    both plans (row-major layers hand the int8 GEMV's rows to the GEMM sooner: table.INT8_STRIPS_GEMV_MAX_ROWS)."""
    rng, _, in_strips, row_major = _plans(n_in, n_out, group_size, sym, 2, plan_mode)
    seen = set()
    for n_rows in ROWS:
        x = (rng.standard_normal((n_rows, n_in)) * 3).astype(np.float32)
        name = table.choose(table.layer_of(in_strips), n_rows, mode, "avx2")
        seen.add(name)
        y = gptq.gptq_matmul(in_strips, x, mode)
        np.testing.assert_array_equal(y, gptq.run(name, in_strips, x), err_msg=f"{name}, {n_rows} rows")
        np.testing.assert_array_equal(y, gptq.run(name, row_major, x), err_msg=f"{name}, {n_rows} rows")
    assert seen == set(table.kernels_for(table.layer_of(in_strips), mode, "avx2"))


@pytest.mark.parametrize("n_in,n_out,group_size,sym", LAYERS)
def test_exact_kernels_are_float32_x_at_w(n_in, n_out, group_size, sym):
    """Within float32 rounding of sum |x| |w| of float64 x @ W from the packer's own W (one rounding per input and
    per fold; the tiles' runs are shorter than a group)."""
    rng, layer, in_strips, _ = _plans(n_in, n_out, group_size, sym, 3)
    w64 = layer["W"].astype(np.float64)                                        # [in, out]
    for n_rows in (1, 7, 30):
        x = rng.standard_normal((n_rows, n_in)).astype(np.float32)
        x64 = x.astype(np.float64)
        bound = (n_in + 2 * len(in_strips.seg_group) + 4) * 2.0 ** -24 * (np.abs(x64) @ np.abs(w64))
        assert (np.abs(gptq.gptq_matmul(in_strips, x) - x64 @ w64) <= bound).all()


def test_only_whole_strips_of_4_bit_layers_are_stored_so():
    rng = np.random.default_rng(4)
    for bits, n_out, tier in [(3, 64, "avx2"), (4, 80, "avx2"), (4, 64, "generic")]:
        layer = make_layer(rng, 256, n_out, bits, 64, act_order=True)
        plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, "gptq", tier=tier)
        assert plan.repacked and plan.strip == n_out and table.layer_of(plan).layout == "segments"


def test_a_kernel_that_reads_only_rows_is_refused_by_name():
    """gptq.run names the kernel and the layout instead of computing from words it would misread."""
    _, _, in_strips, row_major = _plans(256, 128, 32, True, 5)
    x = np.ones((2, 256), dtype=np.float32)
    with pytest.raises(ValueError, match="kernel gemv does not read the strips layout"):
        gptq.run("gemv", in_strips, x)
    np.testing.assert_array_equal(gptq.run("gemv", row_major, x).shape, (2, 128))
