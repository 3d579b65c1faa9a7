"""The compiled steps between the matmuls (kernels/generic/rowwise.py) against float64 references written
here from the formulas, and against ops.py's NumPy where the bits must be the same."""

import numba
import numpy as np
import pytest

from tinyllama_ref import ops
from tinyllama_ref.kernels.generic import rowwise


def attend_f64(q, k, v, start):
    """Causal grouped-query attention in float64, one query head at a time, from the definition."""
    T, H, hd = q.shape
    S, KV, _ = k.shape
    out = np.zeros((T, H, hd))
    for t in range(T):
        for head in range(H):
            kv = head // (H // KV)
            keys = np.arange(start + t + 1)                          # causal: keys 0 .. start + t
            s = k[keys, kv].astype(np.float64) @ q[t, head].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, head] = (p / p.sum()) @ v[keys, kv].astype(np.float64)
    return out


@pytest.mark.parametrize("n, d", [(1, 4096), (3, 24), (2, 4100), (5, 7)])
def test_rms_norm_is_the_formula_to_float32_round_off(n, d):
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.01, 100, (n, 1))).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + 1e-5) * w
    got = rowwise.rms_norm(x, w, 1e-5)
    assert got.dtype == np.float32 and got.shape == (n, d)
    assert np.abs(got - expected).max() <= 4e-7 * np.abs(expected).max()


def test_rms_norm_of_a_hand_computed_row():
    # [3, 4]: mean of squares 12.5, plus eps 0 -> divide by sqrt(12.5) = 3.5355339...
    got = rowwise.rms_norm(np.array([[3.0, 4.0]], np.float32), np.array([1.0, 2.0], np.float32), 0.0)
    np.testing.assert_allclose(got, [[3 / 12.5 ** 0.5, 8 / 12.5 ** 0.5]], rtol=1e-7)


def test_rms_norm_rows_are_independent_of_the_row_count():
    """The numba backend norms a prompt's rows in blocks and a decode step's row alone: same bits."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 512)).astype(np.float32)
    w = rng.standard_normal(512).astype(np.float32)
    whole = ops.rms_norm(x, w, 1e-6, backend="numba")                # blocks of rows on the threads
    for r in (0, 17, 39):
        assert np.array_equal(ops.rms_norm(x[r:r + 1], w, 1e-6, backend="numba")[0], whole[r])


@pytest.mark.parametrize("t, heads, hd", [(1, 32, 128), (3, 4, 8), (2, 5, 64)])
def test_rope_gives_numpys_bits(t, heads, hd):
    rng = np.random.default_rng(hd)
    cos, sin = ops.rope_tables(40, hd, 10000.0)
    x = rng.standard_normal((t, heads, hd)).astype(np.float32)
    pos = slice(30, 30 + t)
    assert np.array_equal(rowwise.apply_rope(x, cos[pos], sin[pos]), ops.apply_rope(x, cos[pos], sin[pos]))


def test_rope_of_a_hand_computed_pair():
    # hd 2: [a, b] -> [a cos - b sin, b cos + a sin], a rotation by the angle
    angle = 0.5
    cos = np.full((1, 2), np.cos(angle), np.float32)
    sin = np.full((1, 2), np.sin(angle), np.float32)
    got = rowwise.apply_rope(np.array([[[1.0, 2.0]]], np.float32), cos, sin)[0, 0]
    np.testing.assert_allclose(got, [np.cos(angle) - 2 * np.sin(angle), 2 * np.cos(angle) + np.sin(angle)],
                               rtol=1e-6)


SHAPES = [   # T, H, KV, S, hd: decode, GQA groups of 8, a short chunk, head sizes not a multiple of 16, one key
    (1, 32, 32, 48, 128), (1, 64, 8, 100, 128), (3, 8, 2, 20, 64), (2, 4, 2, 7, 24), (1, 2, 1, 1, 8),
    (5, 6, 3, 5, 40),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attend_is_causal_softmax_attention(shape):
    T, H, KV, S, hd = shape
    rng = np.random.default_rng(S)
    q = (rng.standard_normal((T, H, hd)) * 2).astype(np.float32)
    k = (rng.standard_normal((S, KV, hd)) * 2).astype(np.float32)
    v = rng.standard_normal((S, KV, hd)).astype(np.float32)
    start = S - T
    expected = attend_f64(q, k, v, start)
    got = rowwise.attend(q, k, v, start)
    assert got.dtype == np.float32 and got.shape == (T, H, hd)
    assert np.abs(got - expected).max() <= 2e-6 * np.abs(v).max()


def test_attend_sees_only_earlier_keys():
    """One query at position 0 of a 3-key cache: its output is the first value, whatever the later keys."""
    q = np.ones((1, 1, 16), np.float32)
    k = np.stack([np.zeros((1, 16)), np.full((1, 16), 50.0), np.full((1, 16), -50.0)]).astype(np.float32)
    v = np.arange(48, dtype=np.float32).reshape(3, 1, 16)
    assert np.array_equal(rowwise.attend(q, k, v, 0)[0, 0], v[0, 0])


def test_attend_bits_do_not_depend_on_threads():
    """The kv heads are spread over the threads for long contexts; a head's numbers stay the same."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 16, 64)).astype(np.float32)
    k = rng.standard_normal((300, 8, 64)).astype(np.float32)
    v = rng.standard_normal((300, 8, 64)).astype(np.float32)
    scale = np.float32(64 ** -0.5)

    def scratch():
        return np.empty((16, 300), np.float32), np.empty((16, 64), np.float32)
    one = np.empty_like(q)
    rowwise.attend_heads(q, k, v, 298, scale, one, 0, 8, *scratch())
    before = numba.get_num_threads()
    try:
        for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(threads)
            for tasks in (1, 2, 3, 8):
                out = np.empty_like(q)
                rowwise.attend_parallel(q, k, v, 298, scale, out, *scratch(), tasks)
                assert np.array_equal(out, one), (threads, tasks)
    finally:
        numba.set_num_threads(before)
