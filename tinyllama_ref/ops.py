"""The small pieces of math a Llama block is made of, as pure NumPy functions in float32.

Each follows Hugging Face's LlamaForCausalLM (transformers/models/llama/modeling_llama.py) exactly, so that
our logits agree with PyTorch to float32 round-off.

backend="numba" runs RMSNorm and the RoPE of a few rows compiled (kernels/generic/rowwise.py: in a decode step
NumPy's dispatch and temporaries cost more than the arithmetic), and the rest of the NumPy code on blocks of rows
spread over the threads (kernels/generic/slabs.py), so that both cores share the work of a prompt. RoPE and
SiLU give the same bits either way; the compiled RMSNorm adds its sum of squares in another order (float32
round-off apart), and backend "numba" uses it for every row count, so a row has the same bits in a prompt as in
a decode step.
"""

import numpy as np

PARALLEL_ROWS = 16     # rows from which the numba backend splits element-wise work over the threads


def _by_rows(backend, n_rows):
    return backend == "numba" and n_rows >= PARALLEL_ROWS


def _row_parallel(fn, out, *arrays):
    """out[r0:r1] = fn(*(a[r0:r1] for a in arrays)) over blocks of rows on all threads; returns out."""
    from .kernels.generic.slabs import run_row_blocks

    def work(r0, r1):
        out[r0:r1] = fn(*(a[r0:r1] for a in arrays))
    run_row_blocks(out.shape[0], work)
    return out


def rms_norm(x, weight, eps, backend="numpy"):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 like LlamaRMSNorm."""
    if backend == "numba":
        from .kernels.generic import rowwise
        if x.shape[0] >= PARALLEL_ROWS:
            return _row_parallel(lambda rows: rowwise.rms_norm(rows, weight, eps), np.empty_like(x), x)
        return rowwise.rms_norm(x, weight, eps)                         # [N, D]
    variance = np.mean(x * x, axis=-1, keepdims=True)                # [N, 1]
    return (x / np.sqrt(variance + eps)) * weight                       # [N, D]


def silu(x):
    """x * sigmoid(x), written so large negative x does not overflow exp()."""
    return x / (1.0 + np.exp(-np.clip(x, -88.0, 88.0)))


def swiglu(gate, up, backend="numpy"):
    """silu(gate) * up: the gated activation of the Llama MLP. [N, F], [N, F] -> [N, F]."""
    if _by_rows(backend, gate.shape[0]):
        from .kernels.generic.slabs import run_row_blocks
        out = np.empty_like(gate)                                        # [N, F]
        run_row_blocks(out.shape[0], lambda r0, r1: _swiglu_into(gate[r0:r1], up[r0:r1], out[r0:r1]))
        return out
    return silu(gate) * up


def _swiglu_into(gate, up, out):
    """out = silu(gate) * up, the same operations as silu() in the same order (so the same bits), done in
    place in out instead of through four temporaries of [rows, F] (measured: 18 -> 7 ms for one 512 x 11008 call)."""
    np.clip(gate, -88.0, 88.0, out=out)
    np.negative(out, out=out)
    np.exp(out, out=out)
    np.add(out, 1.0, out=out)
    np.divide(gate, out, out=out)
    np.multiply(out, up, out=out)


def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True))


def rope_tables(n_positions, head_dim, theta, scaling_factor=1.0):
    """cos and sin of the rotary angles for positions 0..n_positions-1, each [n_positions, head_dim].

    Frequencies as in HF: inv_freq[i] = theta ** (-2i / d). "linear" rope scaling divides the position.
    HF computes the angles in float32 (pos * inv_freq with float32 inv_freq), and so do we: computing them in
    float64 would differ from PyTorch by ~1e-4 radians at position 4000.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32) / np.float32(scaling_factor)  # [hd/2]
    pos = np.arange(n_positions, dtype=np.float32)                       # [P]
    angles = np.outer(pos, inv_freq).astype(np.float32)                  # [P, hd/2]
    angles = np.concatenate([angles, angles], axis=-1)                   # [P, hd]  halves, not pairs
    return np.cos(angles), np.sin(angles)


def rotate_half(x):
    """[a, b] -> [-b, a] over the last axis (the HF 'rotate_half' convention)."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin, backend="numpy"):
    """Rotate each head of x [T, heads, hd] by the angles of its position; cos/sin are [T, hd]."""
    if _by_rows(backend, x.shape[0]):
        return _row_parallel(apply_rope, np.empty_like(x), x, cos, sin)
    if backend == "numba":
        from .kernels.generic import rowwise
        return rowwise.apply_rope(x, cos, sin)                          # [T, heads, hd], same bits
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]        # [T, heads, hd]
