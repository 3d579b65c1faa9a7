"""The Numba GPTQ kernels (kernels/gptq*.py) against the independent packer and the NumPy reference."""

import inspect

import numpy as np
import pytest

from gptq_packer import make_layer, quantize_config
from tinyllama_ref import quant
from tinyllama_ref.kernels import gptq, table
from tiers import RUNNABLE, below, needs
from tinyllama_ref.kernels.generic import gptq_passes, gptq_prefill

MEDITRON = [(4, -1), (4, 128), (4, 32), (3, -1), (3, 128), (3, 32)]
CASES = ([dict(bits=b, group_size=g, act_order=True) for b, g in MEDITRON]
         + [dict(bits=4, group_size=128, sym=False), dict(bits=3, group_size=32, sym=False, act_order=True),
            dict(bits=4, group_size=64, checkpoint_format="gptq_v2", sym=False),
            dict(bits=3, group_size=128, checkpoint_format="gptq_v2", act_order=True, sym=False),
            dict(bits=2, group_size=32, sym=False, act_order=True), dict(bits=8, group_size=64, sym=False)])


def _id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def _close(y, expected):
    """Agreement to 1e-4 of the output's scale: float32 sums in another order, nothing more."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * scale)


def _plan(layer, case):
    return gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], case["bits"],
                        case.get("checkpoint_format", "gptq"))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_kernel_reproduces_x_at_w(case):
    rng = np.random.default_rng(5)
    layer = make_layer(rng, 256, 96, **case)
    plan = _plan(layer, case)
    for n_rows in (1, 3, table.GEMV_MAX_ROWS + 5):           # fused GEMV once, a few times, tile + BLAS
        x = rng.normal(size=(n_rows, 256)).astype(np.float32)                    # [N, in]
        _close(gptq.gptq_matmul(plan, x), x @ layer["W"])


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_dequantized_tiles_equal_w(case, monkeypatch):
    """The prefill tiles are W itself (rows in the plan's order), exactly; small tiles force many of them."""
    layer = make_layer(np.random.default_rng(6), 256, 96, **case)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], case["bits"],
                        case.get("checkpoint_format", "gptq"), strips_ok=False)   # the generic slabs read rows
    rows = np.arange(layer["W"].shape[0]) if plan.perm is None else plan.perm
    codes = gptq.unit_shape(case["bits"])[1]
    tile = np.empty((plan.n_padded, 96), dtype=np.float32)
    gptq_prefill.dequantize_tile(plan.qw, plan.seg_start, plan.seg_group, plan.scales, plan.qzeros, plan.bits,
                                 plan.zero_add, 0, plan.n_padded // codes, 0, 96, tile)
    real = np.flatnonzero(rows >= 0)                        # tile rows that hold an input (not padding)
    np.testing.assert_array_equal(tile[real], layer["W"][rows[real]])
    monkeypatch.setattr(gptq, "TILE_FLOATS", 64 * 300)    # 64-column slabs: 96 columns = 2 slabs, one partial
    x = np.random.default_rng(1).normal(size=(7, 256)).astype(np.float32)
    _close(gptq.gptq_matmul(plan, x), x @ layer["W"])


@pytest.mark.parametrize("bits", [4, 3])
def test_arbitrary_g_idx_uneven_groups(bits):
    """desc_act with any g_idx: groups of unequal, unaligned sizes, one group empty."""
    rng = np.random.default_rng(bits)
    g_idx = rng.integers(0, 4, size=128).astype(np.int32)
    g_idx[g_idx == 2] = 3                                   # group 2 holds no input at all
    layer = make_layer(rng, 128, 64, bits, 32, sym=False, g_idx=g_idx)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, "gptq")
    assert plan.repacked and 2 not in plan.seg_group
    for n_rows in (1, 6):
        x = rng.normal(size=(n_rows, 128)).astype(np.float32)
        _close(gptq.gptq_matmul(plan, x), x @ layer["W"])


@pytest.mark.parametrize("n_in,n_out,bits,group_size,act_order", [
    (200, 40, 4, 64, False),    # last group has 8 inputs; zero-copy
    (200, 40, 4, 64, True),
    (96, 33, 3, 64, True),      # out not a multiple of 32 (qzeros' last word partly padding)
    (80, 24, 3, 32, False),     # 3-bit inputs not a multiple of 32: repacked with padding
    (72, 8, 4, 32, True),
    (48, 20, 8, 32, False),
])
def test_odd_shapes(n_in, n_out, bits, group_size, act_order):
    rng = np.random.default_rng(n_in + n_out)
    layer = make_layer(rng, n_in, n_out, bits, group_size, act_order=act_order, sym=False)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, "gptq")
    for n_rows in (1, 9):
        x = rng.normal(size=(n_rows, n_in)).astype(np.float32)
        _close(gptq.gptq_matmul(plan, x), x @ layer["W"])


def test_layout_choice_and_no_float_copy():
    rng = np.random.default_rng(9)
    plain = make_layer(rng, 256, 64, 4, 32)
    plan = gptq.prepare(plain["qweight"], plain["qzeros"], plain["scales"], plain["g_idx"], 4, "gptq")
    assert not plan.repacked and np.shares_memory(plan.qw, plain["qweight"])    # zero-copy
    assert len(plan.seg_group) == 8
    assert plan.const_zero == 8                              # symmetric: zeros need no unpacking per call
    for bits, n_out in [(3, 40), (2, 33), (8, 20)]:
        sym = make_layer(rng, 64, n_out, bits, 32, checkpoint_format="gptq_v2")
        asym = make_layer(rng, 64, n_out, bits, 32, sym=False)
        assert gptq.prepare(sym["qweight"], sym["qzeros"], sym["scales"], sym["g_idx"], bits,
                            "gptq_v2").const_zero == 2 ** (bits - 1)
        assert gptq.prepare(asym["qweight"], asym["qzeros"], asym["scales"], asym["g_idx"], bits,
                            "gptq").const_zero == -1
    one_group = make_layer(rng, 256, 64, 3, -1, act_order=True)
    plan = gptq.prepare(one_group["qweight"], one_group["qzeros"], one_group["scales"], one_group["g_idx"], 3,
                        "gptq")
    assert not plan.repacked and len(plan.seg_group) == 1
    act = make_layer(rng, 256, 64, 4, 32, act_order=True)
    plan = gptq.prepare(act["qweight"], act["qzeros"], act["scales"], act["g_idx"], 4, "gptq")
    assert plan.repacked and plan.qw.dtype == np.uint32 and plan.qw.size == act["qweight"].size
    assert plan.n_packed == act["qweight"].shape[0]
    # Whatever the plan keeps is packed integers or small per-row bookkeeping, never the float matrix.
    for value in vars(plan).values():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            raise AssertionError(f"plan keeps a float array of shape {value.shape}")


@pytest.mark.parametrize("case", [dict(bits=4, group_size=32, act_order=True, sym=False),
                                  dict(bits=3, group_size=128, act_order=True)], ids=_id)
def test_gptq_linear_backends_agree(case):
    rng = np.random.default_rng(12)
    layer = make_layer(rng, 256, 64, bias=True, **case)
    cfg = quant.parse_quant_config(quantize_config(case["bits"], case["group_size"], True,
                                                   sym=case.get("sym", True)), "quantize_config.json")
    args = (layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], cfg, 256, 64)
    ref = quant.GPTQLinear(*args, bias=layer["bias"], backend="numpy")
    fast = quant.GPTQLinear(*args, bias=layer["bias"], backend="numba")
    assert fast.prepare_seconds > 0 and ref.prepare_seconds == 0
    assert fast.nbytes == ref.nbytes
    for n_rows in (1, 12):
        x = rng.normal(size=(n_rows, 256)).astype(np.float32)
        expected = x @ layer["W"] + layer["bias"].astype(np.float32)
        _close(ref(x), expected)
        _close(fast(x), expected)


def test_unrolled_passes_match_their_generator():
    """The hand-unrolled inner loops in kernels/generic/gptq_passes.py are exactly what pass_source() writes."""
    for bits, passes in gptq_passes.PASSES.items():
        for words in passes:
            written = inspect.getsource(getattr(gptq_passes, f"_pass_b{bits}_w{words}").py_func)
            assert written == gptq_passes.pass_source(bits, words), (bits, words)


@pytest.mark.parametrize("bits", sorted(gptq_passes.PASSES))
def test_every_pass_weighs_each_bit_once(bits):
    """Set one bit per column: column j holds bit b = j mod (32 * words) of the pass's words and nothing else.
    Codes are a little-endian bit stream, so that bit is bit b % bits of code b // bits, and the pass must add
    exactly x[b // bits] * 2**(b % bits). 300 columns: two whole 128-column chunks and a partial one."""
    rng = np.random.default_rng(3)
    for words in gptq_passes.PASSES[bits]:
        n_bits = 32 * words
        width = 300
        b = np.arange(width) % n_bits                                          # [width] the bit of column j
        qw = np.zeros((words, width), dtype=np.uint32)                         # [words, width]
        qw[b // 32, np.arange(width)] = np.left_shift(np.uint32(1), (b % 32).astype(np.uint32))
        x = rng.normal(size=n_bits // bits).astype(np.float32)                 # [codes]
        expected = x[b // bits] * np.float32(2.0) ** (b % bits)                # [width], exact
        for ahead in (0, words):
            acc = np.zeros(width, dtype=np.float32)
            getattr(gptq_passes, f"_pass_b{bits}_w{words}")(qw, 0, x, 0, acc, 0, width, ahead)
            np.testing.assert_array_equal(acc, expected, err_msg=f"{bits}-bit, {words} words")


@pytest.mark.parametrize("bits", [4, 3])
def test_wide_blocks_cross_chunks(bits):
    """600 columns: each thread's block spans several 128-column chunks, the last one partial."""
    rng = np.random.default_rng(8)
    layer = make_layer(rng, 256, 600, bits=bits, group_size=64, act_order=True)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, "gptq")
    for n_rows in (1, 2):
        x = rng.normal(size=(n_rows, 256)).astype(np.float32)
        _close(gptq.gptq_matmul(plan, x), x @ layer["W"])


def test_prefill_without_openblas_control(monkeypatch):
    """Where BLAS cannot be held to one thread, the slabs run one after the other: same result."""
    from tinyllama_ref.kernels.generic import slabs
    monkeypatch.setitem(slabs._openblas, "api", None)
    monkeypatch.setattr(gptq, "TILE_FLOATS", 64 * 300)
    rng = np.random.default_rng(21)
    layer = make_layer(rng, 256, 160, 4, 32, act_order=True, sym=False)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq")
    x = rng.normal(size=(10, 256)).astype(np.float32)
    _close(gptq.gptq_matmul(plan, x), x @ layer["W"])


def test_blas_thread_count_is_restored():
    from tinyllama_ref.kernels.generic import slabs
    api = slabs._find_openblas()
    if api is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can reach")
    before = api[0]()
    with slabs.single_threaded_blas() as ok:
        assert ok and api[0]() == 1
    assert api[0]() == before


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_repack_moves_every_code_to_its_sorted_row(bits):
    """The load-time repack (repack_words for 2/4/8 bits, repack_rows for 3) against NumPy: unpack the codes,
    take rows in perm's order (a zero code for padding), pack again."""
    rng = np.random.default_rng(bits)
    n_in, n_out = 96, 300                                    # 300 columns: one whole 256-column strip and a part
    codes = rng.integers(0, 1 << bits, size=(n_in, n_out))
    qw = quant.pack_columns(codes, bits).view(np.uint32)
    perm = np.concatenate([rng.permutation(n_in), np.full(32, -1)]).astype(np.int64)   # 128 rows, 32 padding
    rng.shuffle(perm)
    expected = np.where(perm[:, None] >= 0, codes[np.maximum(perm, 0)], 0)             # [128, out]
    new_qw = np.zeros((128 * bits // 32, n_out), dtype=np.uint32)
    (gptq.repack_rows if bits == 3 else gptq.repack_words)(qw, perm, bits, new_qw)
    np.testing.assert_array_equal(new_qw, quant.pack_columns(expected, bits).view(np.uint32))


def test_compile_note_asks_only_about_the_kernel_that_runs(monkeypatch, capsys):
    """The note is printed just before a kernel without a cached build runs, not for kernels the table would
    choose for other row counts: a decode row with a cold prefill kernel says nothing."""
    from tinyllama_ref.kernels import compile_note
    layer = make_layer(np.random.default_rng(4), 128, 32, 4, 32)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq")
    decode = table.dispatchers(table.choose(table.layer_of(plan), 1, "exact", plan.tier))
    prefill = table.dispatchers(table.choose(table.layer_of(plan), 64, "exact", plan.tier))
    cold = set(prefill) - set(decode)
    assert cold
    monkeypatch.setattr(compile_note, "is_cached", lambda d: d not in cold)
    monkeypatch.setattr(compile_note, "_said", {})
    monkeypatch.setattr(compile_note, "_warm", set())
    x = np.random.default_rng(5).standard_normal((64, 128)).astype(np.float32)
    gptq.gptq_matmul(plan, x[:1])
    assert "compiling" not in capsys.readouterr().err
    gptq.gptq_matmul(plan, x)
    assert "compiling GPTQ kernels" in capsys.readouterr().err


def test_compile_note_reads_the_cache_for_this_cpu():
    """A kernel that has run in this process (cache=True) has a build in Numba's index for this target CPU."""
    from tinyllama_ref.kernels import compile_note
    layer = make_layer(np.random.default_rng(4), 128, 32, 4, 32)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq")
    x = np.random.default_rng(5).standard_normal((2, 128)).astype(np.float32)
    gptq.gptq_matmul(plan, x)
    for d in table.dispatchers(table.choose(table.layer_of(plan), 2, "exact", plan.tier)):
        assert compile_note.is_cached(d)
