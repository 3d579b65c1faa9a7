"""The key/value cache: what each layer's attention remembers about the tokens it has already seen.

Two layouts behind one interface (write / read, `lengths[slot]`, `max_len`), which is all attention.py and
Model.forward use:

  KVCache        one float32 array pair per layer, [slots, max_len, n_kv_heads, head_dim]: a slot is one
                 sequence, reserved whole up front. For a batch whose lengths are known (generate, scoring).
  PagedKVCache   one pool per layer, [n_blocks, BLOCK_SIZE, n_kv_heads, head_dim]: a sequence takes blocks
                 as it grows and a block table says which ones are its (the server, where sequences come and
                 go and most are far shorter than the context). Blocks whose tokens another request starts
                 with are shared (prefix reuse); see PagedKVCache.

Preallocating (instead of concatenating per token) keeps decode free of per-token allocations, and makes the
memory known up front so it can be counted in the memory budget. Reading a paged sequence gathers its blocks
into one [S, KV, hd] float32 array, so attention computes exactly what it computes on a KVCache slot.
"""

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .errors import MemoryBudgetError
from .memory import human

BLOCK_SIZE = 16          # positions per block: llama.cpp and vLLM use 16-256; small blocks waste less per sequence
MIN_REUSE = 4            # rows worth copying out of a partial block (fewer: usually just <s> and a space)
POOL_SHARE = 4           # by default the pool takes 1/POOL_SHARE of what resident layers and the pool share ...
KV_DTYPES = {"f32": np.float32, "f16": np.float16}   # ... or everything the layers leave when all are resident


def bytes_per_position(cfg, kv_dtype="f32"):
    """K and V of one position in every layer: 2 x n_layers x n_kv_heads x head_dim x item size."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * np.dtype(KV_DTYPES[kv_dtype]).itemsize


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

    def write(self, layer, slot, start, k, v):
        """Store the keys and values k, v [n, KV, hd] of positions start..start+n-1."""
        self.k[layer][slot, start:start + len(k)] = k                 # [n, KV, hd]
        self.v[layer][slot, start:start + len(v)] = v

    def read(self, layer, slot, end):
        """Keys and values of positions 0..end-1: views [end, KV, hd]."""
        return self.k[layer][slot, :end], self.v[layer][slot, :end]

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


# -- sizing the pool -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolPlan:
    n_blocks: int
    block_size: int
    kv_dtype: str
    nbytes: int              # the K/V arrays of every layer
    max_context: int         # positions of the longest sequence the server accepts

    @property
    def positions(self):
        return self.n_blocks * self.block_size

    def sequences(self, length):
        """How many sequences of `length` positions fit at once (each takes whole blocks)."""
        return self.n_blocks // math.ceil(length / self.block_size)

    def describe(self):
        short = f" or {self.sequences(512)} x 512" if self.max_context > 512 else ""
        return (f"KV cache {self.sequences(self.max_context)} sequences x {self.max_context} positions{short} "
                f"(a pool of {self.positions:,} positions in {self.n_blocks:,} blocks of {self.block_size}, "
                f"{human(self.nbytes)} {self.kv_dtype})")


def plan_pool(cfg, free, weight_bytes, window_bytes, max_batch, max_context, kv_dtype="f32", pool_bytes=None,
              block_size=BLOCK_SIZE):
    """Size the server's KV pool from the memory budget and the model, without building anything.

    free: budget bytes left after the fixed costs (process baseline, output head, JIT reserve, activations);
    weight_bytes: all decoder layers; window_bytes: the streaming window (two layers) needed whenever any
    layer streams. The pool and the resident layers share `free - window_bytes`. By default the pool gets
    everything the layers leave when all of them fit (a 7B on 24 GB), else 1/POOL_SHARE of the shared room
    (a 70B streams either way; the rest keeps layers resident). It never exceeds what max_batch sequences of
    max_context positions could fill, and must hold at least one sequence of max_context positions.
    pool_bytes (--kv-pool) replaces the default size.
    """
    per_block = block_size * bytes_per_position(cfg, kv_dtype)
    one_seq = math.ceil(max_context / block_size)                    # blocks of the longest sequence
    if pool_bytes is None:
        all_resident = free - weight_bytes                           # every layer resident: no window needed
        most = max(all_resident, free - window_bytes)                # the most the pool can take
        want = max(all_resident, (free - window_bytes) // POOL_SHARE) // per_block
        n_blocks = max(min(want, max_batch * one_seq), one_seq)
        if n_blocks * per_block > most:
            raise MemoryBudgetError(
                f"the memory budget cannot hold the KV cache of one sequence of --max-context {max_context} "
                f"positions ({human(one_seq * per_block, round_up=True)} of {kv_dtype} keys and values) next to "
                f"the model's streaming window: {human(max(most, 0))} is left after the weights' minimum. Lower "
                f"--max-context, use --kv-dtype f16, or raise --max-memory")
    else:
        n_blocks = pool_bytes // per_block
        if n_blocks < one_seq:
            raise MemoryBudgetError(
                f"--kv-pool {human(pool_bytes)} holds {n_blocks * block_size} positions of {kv_dtype} keys and "
                f"values, less than one sequence of --max-context {max_context} "
                f"({human(one_seq * per_block, round_up=True)}): raise --kv-pool or lower --max-context")
    return PoolPlan(int(n_blocks), block_size, kv_dtype, int(n_blocks * per_block), max_context)


# -- the server's interface over whole slots --------------------------------------------------------------------
class SlotKVCache:
    """PagedKVCache's interface over a cache of whole slots (model.new_cache), for a model that keeps its keys
    and values elsewhere (distributed/pipeline.py: on its stages). One "block" of max_len positions per
    sequence; no prefix reuse. Model.forward gets this object: what it asks for (lengths, the stages' cache
    id) is the wrapped cache's."""

    prefix_cache = False

    def __init__(self, cache, cfg):
        self.inner, self.lengths, self.max_len = cache, cache.lengths, cache.max_len
        n = len(cache.lengths)
        self.plan = PoolPlan(n, cache.max_len, "f32", n * cache.max_len * bytes_per_position(cfg), cache.max_len)
        self.n_blocks, self.block_size, self.nbytes = n, cache.max_len, self.plan.nbytes
        self.used = [False] * n

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def blocks_for(self, positions):
        return 1

    def available(self):
        return self.n_blocks - sum(self.used)

    def can_open(self, positions):
        return self.available() >= 1

    def open(self, slot, positions):
        self.used[slot], self.lengths[slot] = True, 0

    def close(self, slot=None):
        if slot is None:
            self.inner.close()
        else:
            self.used[slot], self.lengths[slot] = False, 0

    def grow(self, slot, n):
        pass

    def filled(self, slot, tokens, notes=None):
        pass

    def match(self, slot, tokens, limit, need_notes=False):
        return 0

    def usage(self):
        return sum(self.used), 0, self.n_blocks - sum(self.used)


# -- the paged cache -----------------------------------------------------------------------------------------
ROOT = b""               # the key "before" a sequence's first block


def block_key(parent, tokens):
    """A full block's identity: its tokens and (through parent, the key of the block before it) every token
    before them. K/V at a position depend on exactly those tokens, so equal keys mean equal contents."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PagedKVCache:
    """A pool of blocks of BLOCK_SIZE positions per layer; `tables[slot]` lists a sequence's blocks in order.

    A sequence (slot) is opened with a promise of the blocks it may grow to (open: prompt + new tokens), so
    admission waits until the pool can keep every promise, and growing never fails mid-generation. Blocks
    are taken as positions are written (grow), and recorded with their tokens after the pass (filled).

    Prefix reuse: every block with tokens in it is indexed under the key of the full block before it (its
    parent). A new sequence walks that index (match): a full block with its next tokens is shared (a
    reference count, never written again: only the sequence's own last block is written); a block that
    starts with some of its next tokens has those rows copied into a block of its own (copy on write).
    Closed sequences leave their indexed blocks in the pool as cached; a block nobody holds is evicted least
    recently used first when a new one is needed. A sequence's blocks go back deepest first, so a shared
    prefix outlives the continuations hanging off it. prefix_cache=False: no sharing, blocks go straight back.

    Notes: the caller may leave one object per position with its row (filled), which travels with the row
    when it is shared or copied (notes_of). The server keeps each prompt position's logprobs there, so a
    request that wants them takes only rows that have them (match(need_notes=True)), then gives back its
    last position (back_off) to compute it again for the logits that follow it.
    """

    def __init__(self, cfg, plan, n_slots, reservation=None, prefix_cache=True):
        B, KV, hd = plan.block_size, cfg.n_kv_heads, cfg.head_dim
        dtype = KV_DTYPES[plan.kv_dtype]
        # np.zeros asks the OS for zeroed pages: they take memory only once a block is first written, and
        # low-numbered blocks are handed out first, so a lightly used pool stays small.
        shape = (plan.n_blocks, B, KV, hd)
        self.k = [np.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)]   # [NB, B, KV, hd] each
        self.v = [np.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)]
        self.plan, self.block_size, self.n_blocks = plan, B, plan.n_blocks
        self.max_len = plan.max_context
        self.lengths = np.zeros(n_slots, dtype=np.int64)            # positions written, per slot
        self.reservation = reservation
        self.prefix_cache = prefix_cache
        self.tables = [[] for _ in range(n_slots)]                  # slot -> its block ids, in order
        self.chain = [[] for _ in range(n_slots)]                   # slot -> keys of its full blocks
        self.recorded = [0] * n_slots                               # positions whose tokens filled() knows
        self.promised = [0] * n_slots                               # blocks a slot may still take
        self.free = set(range(self.n_blocks))                       # blocks with nothing in them
        self.runs = [range(0)] * n_slots                            # slot -> free blocks it was placed on
        self.placed = [None] * self.n_blocks                        # block -> the slot placed on it
        self.refs = [0] * self.n_blocks
        self.tokens = [[] for _ in range(self.n_blocks)]            # block -> its tokens so far
        self.notes = [[] for _ in range(self.n_blocks)]             # block -> per row: what the caller noted
        self.parent = [None] * self.n_blocks                        # block -> key of the block before it
        self.key = [None] * self.n_blocks                           # block -> its key once full and indexed
        self.full = {}                                              # key -> the block indexed under it
        self.children = {}                                          # parent key -> blocks that follow it
        self.cached = OrderedDict()                                 # blocks nobody holds, oldest first

    # -- the interface attention.py uses ----------------------------------------------------------------------
    def write(self, layer, slot, start, k, v):
        """Store k, v [n, KV, hd] at positions start..start+n-1 of the slot (its blocks were taken by grow)."""
        B, table = self.block_size, self.tables[slot]
        p, end = start, start + len(k)
        while p < end:
            b, r = table[p // B], p % B
            m = min(B - r, end - p)                                  # rows that go into this block
            self.k[layer][b, r:r + m] = k[p - start:p - start + m]   # [m, KV, hd]
            self.v[layer][b, r:r + m] = v[p - start:p - start + m]
            p += m

    def read(self, layer, slot, end):
        """Keys and values of positions 0..end-1, float32 [end, KV, hd]: a view when the slot's blocks are
        consecutive in the pool (and stored as float32), else a gathered copy."""
        blocks = self.tables[slot][:-(-end // self.block_size)]
        k, v = self.k[layer], self.v[layer]                          # [NB, B, KV, hd]
        if blocks[-1] - blocks[0] == len(blocks) - 1 and blocks == list(range(blocks[0], blocks[-1] + 1)):
            k, v = k[blocks[0]:blocks[-1] + 1], v[blocks[0]:blocks[-1] + 1]   # [nb, B, KV, hd] views
        else:
            k, v = k[blocks], v[blocks]                              # [nb, B, KV, hd] copies
        k = k.reshape(-1, *k.shape[2:])[:end]                        # [end, KV, hd]
        v = v.reshape(-1, *v.shape[2:])[:end]
        if k.dtype != np.float32:
            k, v = k.astype(np.float32), v.astype(np.float32)
        return k, v

    # -- sequences come and go ----------------------------------------------------------------------------------
    def blocks_for(self, positions):
        return -(-positions // self.block_size)

    def available(self):
        """Blocks not yet promised to an open sequence (free ones plus cached ones that may be evicted)."""
        return len(self.free) + len(self.cached) - sum(self.promised)

    def can_open(self, positions):
        return self.blocks_for(positions) <= self.available()

    def open(self, slot, positions):
        """Start a sequence in an empty slot that will hold at most `positions` positions."""
        if self.tables[slot] or not self.can_open(positions):
            raise MemoryBudgetError(f"KV slot {slot} is in use, or {positions} positions do not fit the pool")
        self.promised[slot] = self.blocks_for(positions)
        self.lengths[slot], self.recorded[slot] = 0, 0
        self.runs[slot] = self._place(self.promised[slot])
        for b in self.runs[slot]:
            self.placed[b] = slot

    def close(self, slot=None):
        """close(slot): the sequence is over, its blocks go back (indexed ones stay cached, deepest first).
        close(): the whole cache is done, the reservation goes back to the budget."""
        if slot is None:
            if self.reservation is not None:
                self.reservation.release()
                self.reservation = None
            return
        for b in reversed(self.tables[slot]):
            self.refs[b] -= 1
            if self.refs[b] > 0:
                continue
            if self.prefix_cache and self.tokens[b] and (self.key[b] is not None or
                                                         len(self.tokens[b]) < self.block_size):
                self.cached[b] = None                               # newest at the end
            else:                                                   # unindexed (a duplicate full block)
                self._forget(b)
        for b in self.runs[slot]:
            self.placed[b] = None
        self.tables[slot], self.chain[slot], self.runs[slot] = [], [], range(0)
        self.promised[slot] = 0
        self.lengths[slot] = self.recorded[slot] = 0

    def grow(self, slot, n):
        """Take the blocks the next n positions of the slot need (before the pass that writes them)."""
        while len(self.tables[slot]) * self.block_size < int(self.lengths[slot]) + n:
            self.tables[slot].append(self._take(slot))

    def filled(self, slot, tokens, notes=None):
        """After a pass: the slot's positions written by it hold these tokens. Blocks become visible to
        match(), the full ones under their key. notes: one object per token that the pool keeps with its row
        (the server's prompt logprobs) and hands back with it (notes_of); None where there is none."""
        B, start = self.block_size, self.recorded[slot]
        if start + len(tokens) != int(self.lengths[slot]):
            raise ValueError(f"slot {slot}: {len(tokens)} tokens recorded after {start}, but "
                             f"{int(self.lengths[slot])} positions are written")
        for i, t in enumerate(tokens):
            p = start + i
            b = self.tables[slot][p // B]
            self.tokens[b].append(int(t))
            self.notes[b].append(None if notes is None else notes[i])
            if p % B == 0:
                self._index(b, self.chain[slot][-1] if self.chain[slot] else ROOT)
            if len(self.tokens[b]) == B:
                self.chain[slot].append(self._index_full(b))
        self.recorded[slot] = start + len(tokens)

    def match(self, slot, tokens, limit, need_notes=False):
        """Take what the pool already holds of the slot's next tokens (tokens: the whole sequence, of which
        lengths[slot] are in the cache), up to position `limit`. Returns how many positions were added.
        need_notes: only rows that carry a note."""
        if not self.prefix_cache:
            return 0
        B, start = self.block_size, int(self.lengths[slot])
        while self.lengths[slot] < limit:
            L = int(self.lengths[slot])
            r, a = L % B, L - L % B                                  # row in the block, the block's first position
            parent = self.chain[slot][-1] if self.chain[slot] else ROOT
            if r == 0 and a + B <= limit:                            # a whole block: share it
                b = self.full.get(block_key(parent, tokens[a:a + B]))
                if b is not None and (not need_notes or None not in self.notes[b]):
                    self._hold(slot, b)
                    continue
            want = tokens[a:min(a + B, limit)]
            best, m = None, r + MIN_REUSE - 1
            for c in self.children.get(parent, ()):
                if not self.tables[slot] or c != self.tables[slot][-1]:
                    n = common_prefix(self.tokens[c], want)
                    if need_notes and None in self.notes[c][:n]:
                        n = self.notes[c].index(None)
                    if n > m:
                        best, m = c, n
            if best is None or (r == 0 and not self.free and list(self.cached) == [best]):
                break                                                # (no block to copy into but best itself)
            if r == 0:
                self.tables[slot].append(self._take(slot, keep=best))
            own = self.tables[slot][-1]
            for k, v in zip(self.k, self.v):                         # copy on write: rows r..m-1
                k[own, r:m] = k[best, r:m]                           # [m - r, KV, hd]
                v[own, r:m] = v[best, r:m]
            self.lengths[slot] = a + m
            self.filled(slot, tokens[L:a + m], self.notes[best][r:m])
            self._touch(best)
        return int(self.lengths[slot]) - start

    def notes_of(self, slot, start, end):
        """The notes kept with the slot's positions start..end-1."""
        B, table = self.block_size, self.tables[slot]
        return [self.notes[table[p // B]][p % B] for p in range(start, end)]

    def back_off(self, slot):
        """Drop the slot's last position, so the next pass computes it again (its logits are wanted). A block
        others hold too is replaced by a copy of its other rows."""
        B, table = self.block_size, self.tables[slot]
        b, r = table[-1], (int(self.lengths[slot]) - 1) % B
        if self.refs[b] > 1:                                         # shared: keep rows 0..r-1 in our own
            self.promised[slot] += 1                                 # the promise _hold took back
            own = self._take(slot, keep=b)
            for k, v in zip(self.k, self.v):
                k[own, :r] = k[b, :r]                                # [r, KV, hd]
                v[own, :r] = v[b, :r]
            self.refs[b] -= 1
            table[-1] = own
            self.chain[slot].pop()
            self.tokens[own], self.notes[own] = self.tokens[b][:r], self.notes[b][:r]
            if r:
                self._index(own, self.chain[slot][-1] if self.chain[slot] else ROOT)
        else:                                                        # ours alone: shorten it
            if self.key[b] is not None:
                del self.full[self.key[b]]
                self.key[b] = None
            if len(self.tokens[b]) == B:
                self.chain[slot].pop()
            self.tokens[b].pop()
            self.notes[b].pop()
            if not self.tokens[b]:                                   # empty: back to the free blocks
                table.pop()
                self._forget(b)
                self.promised[slot] += 1
        self.lengths[slot] -= 1
        self.recorded[slot] -= 1

    # -- blocks -------------------------------------------------------------------------------------------------
    def _take(self, slot, keep=None):
        """A block with nothing in it for the slot, out of its promise: a free one (_pick), else the least
        recently used cached one (never `keep`, the block about to be copied from)."""
        if self.promised[slot] <= 0:
            raise MemoryBudgetError(f"KV slot {slot} grew past the {len(self.tables[slot])} blocks promised to it")
        if not self.free:
            victim = next(b for b in self.cached if b != keep)
            del self.cached[victim]
            self._forget(victim)
        b = self._pick(slot)
        self.free.remove(b)
        self.promised[slot] -= 1
        self.refs[b] = 1
        return b

    # A sequence whose blocks are consecutive is read as a view, not gathered (read()): that saves copying
    # its keys and values in every layer of every pass. So each sequence is placed on a run of free blocks
    # when it opens, and grows into it while it can; sequences growing side by side do not interleave.
    def _place(self, need):
        """The first run of `need` free blocks no other sequence is placed on (an empty range if none)."""
        length = 0
        for b in range(self.n_blocks):
            length = length + 1 if b in self.free and self.placed[b] is None else 0
            if length == need:
                return range(b - need + 1, b + 1)
        return range(0)

    def _pick(self, slot):
        """Which free block the slot takes: the one after its last, else the first of its run, else the
        lowest free block no other sequence is placed on, else the lowest free block."""
        table = self.tables[slot]
        if table and table[-1] + 1 in self.free and self.placed[table[-1] + 1] in (None, slot):
            return table[-1] + 1
        for b in self.runs[slot]:
            if b in self.free:
                return b
        unplaced = [b for b in self.free if self.placed[b] is None]
        return min(unplaced or self.free)

    def _hold(self, slot, b):
        """Share full block b: it becomes the slot's next block."""
        if self.refs[b] == 0:
            del self.cached[b]
        self.refs[b] += 1
        self.tables[slot].append(b)
        self.chain[slot].append(self.key[b])
        self.promised[slot] -= 1
        self.lengths[slot] += self.block_size
        self.recorded[slot] = int(self.lengths[slot])

    def _touch(self, b):
        if b in self.cached:
            self.cached.move_to_end(b)

    def _index(self, b, parent):
        self.parent[b] = parent
        self.children.setdefault(parent, set()).add(b)

    def _index_full(self, b):
        """Index a full block under its key; a block with notes replaces one without (the same K/V)."""
        key = block_key(self.parent[b], self.tokens[b])
        old = self.full.get(key)
        if old is not None and None in self.notes[old] and None not in self.notes[b]:
            self.key[old] = None
            if self.refs[old] == 0:                                  # cached: nothing else would free it
                del self.cached[old]
                self._forget(old)
            old = None
        if old is None:
            self.full[key] = b
            self.key[b] = key
        return key

    def _forget(self, b):
        """Drop what the index knows of block b and put it on the free list."""
        if self.parent[b] is not None:
            siblings = self.children[self.parent[b]]
            siblings.discard(b)
            if not siblings:
                del self.children[self.parent[b]]
        if self.key[b] is not None:
            del self.full[self.key[b]]
        self.tokens[b], self.notes[b], self.parent[b], self.key[b], self.refs[b] = [], [], None, None, 0
        self.free.add(b)

    # -- numbers for /metrics and the log -----------------------------------------------------------------------
    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def usage(self):
        """(blocks held by sequences, blocks cached for reuse, blocks free)."""
        return self.n_blocks - len(self.free) - len(self.cached), len(self.cached), len(self.free)
