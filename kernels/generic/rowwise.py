"""The steps between the matmuls, compiled: RMSNorm, RoPE and the attention of a few queries.

tinyllama_ref/ops.py and attention.py hold the NumPy statements (the ground truth); backend "numba" calls these.
In a decode step each of them works on one row per sequence, right after a GEMV streamed a layer's weights
through the caches, so NumPy's way (a dozen calls, each with its dispatch and temporaries) ran from memory:
on the 7B shape a token spent 4.3 ms in attention, 2.3 ms in RMSNorm and 1.3 ms in RoPE outside any matmul.

What stays the same and what does not:
  - rope_into: the same float32 products and sums in the same order as NumPy's, so the same bits (Numba does
    not fuse a multiply and an add into an FMA unless asked with fastmath).
  - rms_norm_into: the sum of squares in 16 partial sums, not NumPy's pairwise sum, so float32 round-off apart
    (the rest is NumPy's element formula). Backend "numba" uses it for every row count, so a row gets the
    same bits in a prefill as in a decode step.
  - attend_heads: dot products in 16 partial sums and the C library's expf, so float32 round-off apart from
    NumPy's BLAS and exp. Masked keys are skipped instead of set to -inf (exp(-inf) adds 0 either way).

The 16 partial sums are one 16-lane LLVM vector (_dot16: element i goes to sum i % 16) rather than left to
fastmath: then the order is the same on every tier (AVX2 holds them in two ymm registers, AVX-512 in one zmm),
and the dot product runs at the speed of the vector units instead of one dependent add per element.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .. import compile_note, llvm


V16F = llvm.vec(llvm.F32, 16)


@intrinsic
def _dot16(typingctx, a_addr, b_addr, n16):
    """sum(a * b) over 16 * n16 float32 at byte addresses a_addr, b_addr (int64): one <16 x float> of partial
    sums (lane j takes elements j, j + 16, ...), then halves added: lanes j + 8, j + 4, j + 2, j + 1 onto j."""
    def codegen(context, builder, signature, args):
        a, b, n = args

        def step(i, accs):
            at = builder.mul(i, llvm.I64(64))
            x = llvm.load(builder, llvm.offset(builder, a, at), V16F)
            y = llvm.load(builder, llvm.offset(builder, b, at), V16F)
            return [builder.fadd(accs[0], builder.fmul(x, y))]
        acc = llvm.sum_loop(builder, n, 1, V16F, step, "dot16")[0]
        width = 16
        while width > 1:                                         # [16] -> [8] -> [4] -> [2] -> [1]
            width //= 2
            lo = builder.shuffle_vector(acc, acc, ir.Constant(llvm.vec(llvm.I32, width), list(range(width))))
            hi = builder.shuffle_vector(acc, acc, ir.Constant(llvm.vec(llvm.I32, width),
                                                              list(range(width, 2 * width))))
            acc = builder.fadd(lo, hi)
        return builder.extract_element(acc, llvm.I32(0))
    return types.float32(types.int64, types.int64, types.int64), codegen


@njit(inline="always")
def _dot(a, b):
    """sum(a * b) over float32 vectors [n], each C-contiguous: _dot16 on the first 16 * (n // 16), then the
    rest one by one."""
    n = a.shape[0]
    n16 = n // 16
    s = _dot16(a.ctypes.data, b.ctypes.data, n16)
    for i in range(16 * n16, n):                                 # head sizes that are not a multiple of 16
        s += a[i] * b[i]
    return s


# -- RMSNorm ----------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def rms_norm_into(x, weight, eps, out):
    """out = (x / sqrt(mean(x * x) + eps)) * weight for x, out [N, D] and weight [D] float32, eps a float32.
    NumPy: ops.rms_norm. nogil: ops.py runs blocks of a prefill's rows on both threads."""
    D = x.shape[1]
    for r in range(x.shape[0]):
        row = x[r]
        variance = _dot(row, row) / np.float32(D)
        den = np.float32(np.sqrt(variance + eps))
        for i in range(D):
            out[r, i] = (row[i] / den) * weight[i]


# -- RoPE --------------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def rope_into(x, cos, sin, out):
    """out = x * cos + rotate_half(x) * sin for x, out [T, heads, hd] and cos, sin [T, hd] float32, where
    rotate_half([a, b]) = [-b, a] over the last axis. NumPy: ops.apply_rope (same bits)."""
    half = x.shape[2] // 2
    for t in range(x.shape[0]):
        c, s = cos[t], sin[t]
        for h in range(x.shape[1]):
            v, o = x[t, h], out[t, h]
            for i in range(half):
                o[i] = v[i] * c[i] + (-v[i + half]) * s[i]
            for i in range(half, 2 * half):
                o[i] = v[i] * c[i] + v[i - half] * s[i]


# -- attention of a few queries ------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def attend_heads(q, k, v, start, scale, out, h0, h1, scores, acc):
    """attention.attend for the query heads of kv heads h0 .. h1 - 1: q [T, H, hd] against k, v [S, KV, hd]
    (S >= start + T), float32, written into out [T, H, hd]: softmax((q . k) * scale) over keys 0 .. start + t,
    times v. scores [H, S] and acc [H, hd] are scratch (rows of these query heads only: tasks on other kv
    heads may share them). The cache is [S, KV, hd]: key by key, the heads of one position lie side by side,
    so the loops go over keys outside and heads inside and read the cache front to back (head by head would
    jump KV * hd floats from key to key, a new page every few keys for the hardware prefetcher)."""
    T, H, hd = q.shape
    G = H // k.shape[1]                                          # query heads per kv head
    for t in range(T):
        visible = start + t + 1                                  # keys 0 .. start + t (causal)
        for s in range(visible):
            for h in range(h0, h1):
                for g in range(G):
                    scores[h * G + g, s] = _dot(q[t, h * G + g], k[s, h]) * scale
        for j in range(h0 * G, h1 * G):                          # softmax over the visible keys
            row = scores[j]
            top = np.float32(-np.inf)
            for s in range(visible):
                top = max(top, row[s])
            total = np.float32(0.0)
            for s in range(visible):
                e = np.float32(np.exp(row[s] - top))
                row[s] = e
                total += e
            for s in range(visible):
                row[s] = row[s] / total
            for i in range(hd):
                acc[j, i] = 0.0
        for s in range(visible):                                 # probabilities times values
            for h in range(h0, h1):
                vs = v[s, h]                                     # [hd]
                for g in range(G):
                    p = scores[h * G + g, s]
                    a = acc[h * G + g]
                    for i in range(hd):
                        a[i] += p * vs[i]
        for j in range(h0 * G, h1 * G):                          # (loops, not slices: they compile 4 s faster)
            for i in range(hd):
                out[t, j, i] = acc[j, i]


@njit(cache=True, nogil=True, parallel=True)
def attend_parallel(q, k, v, start, scale, out, scores, acc, tasks):
    """attend_heads for all kv heads, cut into `tasks` runs spread over Numba's threads (the same numbers: a
    head's arithmetic does not depend on which thread runs it). For long contexts, where reading the keys and
    values is the work."""
    KV = k.shape[1]
    for c in prange(tasks):
        attend_heads(q, k, v, start, scale, out, c * KV // tasks, (c + 1) * KV // tasks, scores, acc)


# -- what ops.py and attention.py call ---------------------------------------------------------------------------
PARALLEL_WORK = 1 << 16     # multiply-adds, (T * H + KV) * S * hd, from which attend() uses every thread
_asked = set()


def _ask(dispatcher):
    """The compile note (kernels/compile_note.py) hears of each of these the first time it is about to run:
    cold, they compile for about 4 s in all."""
    if dispatcher not in _asked:
        _asked.add(dispatcher)
        compile_note.before_call([dispatcher])
    return dispatcher


def rms_norm(x, weight, eps):
    """ops.rms_norm for x [N, D] float32 -> [N, D] on the calling thread."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)                                                # [N, D]
    _ask(rms_norm_into)(x, np.ascontiguousarray(weight, dtype=np.float32), np.float32(eps), out)
    return out


def apply_rope(x, cos, sin):
    """ops.apply_rope for x [T, heads, hd] and cos, sin [T, hd] float32 -> [T, heads, hd] (same bits)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)                                                # [T, heads, hd]
    _ask(rope_into)(x, np.ascontiguousarray(cos), np.ascontiguousarray(sin), out)
    return out


def attend(q, k, v, start):
    """attention.attend for q [T, H, hd] and k, v [S, KV, hd] float32 -> [T, H, hd]; on every thread when
    the work is large enough to repay waking them (PARALLEL_WORK)."""
    T, H, hd = q.shape
    S, KV, _ = k.shape
    q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))
    out = np.empty((T, H, hd), dtype=np.float32)                          # [T, H, hd]
    scale = np.float32(hd ** -0.5)                                        # as attention.attend scales
    threads = numba.get_num_threads()
    scores = np.empty((H, S), dtype=np.float32)                           # [H, S]
    acc = np.empty((H, hd), dtype=np.float32)                             # [H, hd]
    if threads > 1 and KV > 1 and (T * H + KV) * S * hd >= PARALLEL_WORK:
        _ask(attend_parallel)(q, k, v, start, scale, out, scores, acc, min(threads, KV))
    else:
        _ask(attend_heads)(q, k, v, start, scale, out, 0, KV, scores, acc)
    return out
