"""Grouped-query causal self-attention with rotary position embeddings and a KV cache.

The rows of `x` may belong to several sequences (a ragged batch packed together, so every weight matrix is
read once for all of them). `seqs` says which rows are which: a list of (slot, start_pos, n_rows).
The projections run on all rows at once; the attention itself runs per sequence against its own cache slot
(kvcache.py: a slot of a KVCache is a view; a paged sequence's blocks are gathered, same numbers).

Three ways to attend, same math: attend() is the reference (all heads in one batched NumPy expression);
backend="numba" uses attend_by_heads() for prompts: one kv head per task, tasks spread over the threads with
single-threaded BLAS (kernels/generic/slabs.py), because NumPy's batched matmul over strided heads ran at about 7
GFLOP/s on the 7B shape (a 512-token prefill spent 10-20 s of 45 in attention); and attend_compiled() for
decode steps and short chunks (kernels/generic/rowwise.py), where NumPy spent 135 us a layer in dispatch and
temporaries on the 7B shape. Either way queries go in
blocks of QUERY_BLOCK, so the score matrix is [heads, QUERY_BLOCK, keys]: linear in the context, not
quadratic.
"""

import numpy as np

from .ops import apply_rope, softmax

QUERY_BLOCK = 256     # queries attended at once: bounds the [heads, queries, keys] score matrix of a long prompt
HEADS_MIN_QUERIES = 8  # numba backend: from this many queries per block attend head by head on all threads


def attend(q, k, v, start):
    """Causal attention of T new queries against S = start + T cached keys, for one sequence.

    q [T, H, hd]; k, v [S, KV, hd]. Query head h reads kv head h // (H // KV), as in HF's repeat_kv.
    """
    T, H, hd = q.shape
    S, KV, _ = k.shape
    G = H // KV                                                       # query heads per kv head
    qg = q.reshape(T, KV, G, hd).transpose(1, 2, 0, 3)                # [KV, G, T, hd]
    kt = k.transpose(1, 2, 0)[:, None]                                # [KV, 1, hd, S]
    scores = (qg @ kt) * np.float32(hd ** -0.5)                       # [KV, G, T, S]
    query_pos = start + np.arange(T)[:, None]                         # [T, 1]
    visible = np.arange(S)[None, :] <= query_pos                      # [T, S] causal mask
    scores = np.where(visible, scores, -np.inf)                       # [KV, G, T, S]
    probs = softmax(scores, axis=-1)                                  # [KV, G, T, S]
    out = probs @ v.transpose(1, 0, 2)[:, None]                       # [KV, G, T, hd]
    return out.transpose(2, 0, 1, 3).reshape(T, H, hd)                # [T, H, hd]


def _attend_head(q, k, v, start, out, h, G):
    """attend() for the G query heads of kv head h, written into out [T, H, hd]."""
    T, _, hd = q.shape
    S = k.shape[0]
    qh = q[:, h * G:(h + 1) * G].transpose(1, 0, 2).reshape(G * T, hd)   # [G * T, hd] (a copy when G > 1)
    scores = (qh @ k[:, h].T) * np.float32(hd ** -0.5)                   # [G * T, S]
    query_pos = start + np.tile(np.arange(T), G)[:, None]                # [G * T, 1]
    scores = np.where(np.arange(S)[None, :] <= query_pos, scores, -np.inf)   # causal mask
    probs = softmax(scores, axis=-1)                                     # [G * T, S]
    out[:, h * G:(h + 1) * G] = (probs @ v[:, h]).reshape(G, T, hd).transpose(1, 0, 2)   # [T, G, hd]


def attend_by_heads(q, k, v, start):
    """attend() computed one kv head per task on all threads (shapes as in attend())."""
    from .kernels.generic.slabs import run_slabs
    T, H, hd = q.shape
    KV = k.shape[1]
    out = np.empty((T, H, hd), dtype=np.float32)                         # [T, H, hd]
    run_slabs(KV, 1, lambda h, _h1, _worker: _attend_head(q, k, v, start, out, h, H // KV))
    return out


def attend_compiled(q, k, v, start):
    """attend() compiled (kernels/generic/rowwise.py): for decode steps and short chunks, where NumPy's dozen
    calls per head group cost more than the arithmetic."""
    from .kernels.generic import rowwise
    return rowwise.attend(q, k, v, start)                                # [T, H, hd]


def attention(x, w, cache, layer_index, seqs, cfg, cos, sin, backend="numpy"):
    """Self-attention of one layer for the rows x [N, D]; writes the new keys/values into the cache."""
    N = x.shape[0]
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = w.q(x).reshape(N, H, hd)                                      # [N, H, hd]
    k = w.k(x).reshape(N, KV, hd)                                     # [N, KV, hd]
    v = w.v(x).reshape(N, KV, hd)                                     # [N, KV, hd]
    out = np.empty((N, H, hd), dtype=np.float32)                      # [N, H, hd]
    row = 0
    for slot, start, n in seqs:
        rows, pos = slice(row, row + n), slice(start, start + n)
        q_s = apply_rope(q[rows], cos[pos], sin[pos], backend)        # [n, H, hd]
        cache.write(layer_index, slot, start, apply_rope(k[rows], cos[pos], sin[pos], backend), v[rows])
        k_s, v_s = cache.read(layer_index, slot, start + n)           # [start + n, KV, hd] float32
        for b in range(0, n, QUERY_BLOCK):                            # long prompts: blocks of queries
            m = min(QUERY_BLOCK, n - b)
            end = start + b + m                                       # keys visible to this block
            attend_block = attend if backend != "numba" else attend_by_heads if m >= HEADS_MIN_QUERIES else \
                attend_compiled
            out[row + b:row + b + m] = attend_block(q_s[b:b + m], k_s[:end], v_s[:end], start + b)
        row += n
    return w.o(out.reshape(N, H * hd))                                # [N, D]
