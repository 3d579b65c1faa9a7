"""The key/value cache: what each layer's attention remembers about the tokens it has already seen.

One preallocated float32 array pair per layer, [slots, max_len, n_kv_heads, head_dim]. A slot holds one
sequence of a batch; `lengths[slot]` says how many positions of it are filled. Preallocating (instead of
concatenating per token) keeps decode free of per-token allocations, and makes its memory known up front so
it can be counted in the memory budget.
"""

import numpy as np


class KVCache:
    """reservation: the memory budget's Reservation for this cache (model.new_cache makes one); closing the
    cache, or leaving its `with` block, gives it back."""

    def __init__(self, n_layers, n_slots, max_len, n_kv_heads, head_dim, reservation=None):
        shape = (n_slots, max_len, n_kv_heads, head_dim)
        self.k = [np.zeros(shape, dtype=np.float32) for _ in range(n_layers)]   # [B, S, KV, hd] each
        self.v = [np.zeros(shape, dtype=np.float32) for _ in range(n_layers)]
        self.lengths = np.zeros(n_slots, dtype=np.int64)
        self.max_len = max_len
        self.reservation = reservation

    def close(self):
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @staticmethod
    def bytes_needed(n_layers, n_slots, max_len, n_kv_heads, head_dim):
        return 2 * n_layers * n_slots * max_len * n_kv_heads * head_dim * 4

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def copy_slot(self, src, dst, length=None):
        """Fork a sequence: slot dst gets the first `length` positions of slot src (default: all of them).

        Several continuations of one context (the options of a multiple-choice item) each need the context's
        keys and values in their own slot, because each writes its own tokens after them; copying the
        context once per option is far cheaper than running it through the model once per option.
        """
        n = int(self.lengths[src]) if length is None else int(length)
        if not 0 <= n <= int(self.lengths[src]):
            raise ValueError(f"slot {src} holds {int(self.lengths[src])} positions, cannot copy {n}")
        for k, v in zip(self.k, self.v):
            k[dst, :n] = k[src, :n]                                           # [n, KV, hd]
            v[dst, :n] = v[src, :n]
        self.lengths[dst] = n
