"""Grouped-query causal self-attention with rotary position embeddings and a KV cache.

The rows of `x` may belong to several sequences (a ragged batch packed together, so every weight matrix is
read once for all of them). `seqs` says which rows are which: a list of (slot, start_pos, n_rows).
The projections run on all rows at once; the attention itself runs per sequence against its own cache slot.
"""

import numpy as np

from .ops import apply_rope, softmax

QUERY_BLOCK = 256     # queries attended at once: bounds the [heads, queries, keys] score matrix of a long prompt


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


def attention(x, w, cache, layer_index, seqs, cfg, cos, sin):
    """Self-attention of one layer for the rows x [N, D]; writes the new keys/values into the cache."""
    N = x.shape[0]
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = w.q(x).reshape(N, H, hd)                                      # [N, H, hd]
    k = w.k(x).reshape(N, KV, hd)                                     # [N, KV, hd]
    v = w.v(x).reshape(N, KV, hd)                                     # [N, KV, hd]
    k_cache, v_cache = cache.k[layer_index], cache.v[layer_index]     # [B, S_max, KV, hd]
    out = np.empty((N, H, hd), dtype=np.float32)                      # [N, H, hd]
    row = 0
    for slot, start, n in seqs:
        rows, pos = slice(row, row + n), slice(start, start + n)
        q_s = apply_rope(q[rows], cos[pos], sin[pos])                 # [n, H, hd]
        k_cache[slot, pos] = apply_rope(k[rows], cos[pos], sin[pos])  # [n, KV, hd]
        v_cache[slot, pos] = v[rows]
        for b in range(0, n, QUERY_BLOCK):                            # long prompts: blocks of queries
            m = min(QUERY_BLOCK, n - b)
            end = start + b + m                                       # keys visible to this block
            out[row + b:row + b + m] = attend(q_s[b:b + m], k_cache[slot, :end], v_cache[slot, :end], start + b)
        row += n
    return w.o(out.reshape(N, H * hd))                                # [N, D]
