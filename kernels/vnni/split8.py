"""Decode at float32 accuracy on VNNI: each activation split exactly into four int8 pieces.

The float GEMV (gptq_gemv.py) spends three vector operations per 16 weights: AND, int->float conversion,
FMA. The int8 mode (int8.py) spends about a fifth of that with vpdpbusd, but rounds x to 8 bits. Here x is
not rounded: per block of 32 inputs it is written as a sum of four int8 vectors on power-of-two scales,
    x_i = s0 * m0_i + s1 * m1_i + s2 * m2_i + s3 * m3_i + r_i      s_p = s0 / 128^p
with s0 the smallest power of two such that max|x| <= 127 s0, m0 = rint(x / s0) in [-127, 127] and each
next piece the rounded remainder, in [-64, 64]. Every step is exact in float32 (a power-of-two scale and a
remainder smaller than the previous scale), so r_i is the only thing lost: |r_i| <= s3 / 2 = s0 / 2^22,
below 2^-28 of the block's largest |x|, and zero for every input within 1/32 of it (those fit in 29 bits).

Per block b, column j, the four integer dot products with the codes are exact int32 sums, and pairs of them
fit one float32 exactly (|128 t0 + t1| < 2^24):
    acc_j += s1 * float32(128 t0_j + t1_j)  +  s3 * float32(128 t2_j + t3_j)
two roundings per 32 inputs where the FMA path has 32. Scale and zero are applied per segment as in the
float path, y_j += s_gj (acc_j - z_gj sum_i (x_i - r_i)): y is (x - r) @ W up to float32 rounding, so
    |y_j - (x @ W)_j| <= float32 rounding + sum over blocks b of 2^-22 s0_b sum_{i in b} |w_ij|
and 2^-22 s0_b < 2^-28 max_{i in b} |x_i|. (The float path's own rounding is about 2^-24 sum_i |x_i w_ij|.)

Layout: the int8 mode's ("segments" plans with whole blocks of 32; `word & 0x0F0F0F0F` are the codes of
inputs 0, 2, 4, 6, `(word >> 4) & 0x0F0F0F0F` those of 1, 3, 5, 7), with four pieces per block:
    xw [blocks, N, 4, 8] int32     piece p of the block's 32 inputs, packed in fours in that order
    xs [blocks, N, 2] float32      s1, s3 (NaN when the block holds a NaN or an infinity: the row is NaN)
Cost per packed word and 16 columns (128 weights): 3 integer operations and 8 vpdpbusd, against 8 ANDs,
8 conversions and 8 FMAs for the float path.
"""

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..generic import tasks
from ..generic.block_decode import decode_blocks
from .. import llvm

BLOCK = 32                 # inputs per block: 4 packed words of 4-bit codes
PIECES = 4                 # int8 pieces per activation
STEP = 7                   # bits between the scales of consecutive pieces (remainders fit [-64, 64])
MIN_EXPONENT = -120        # s0 >= 2^-120, so s3 = s0 / 2^21 is still a normal-or-subnormal exact float32
_POW2_BIAS = 200
_POW2 = 2.0 ** np.arange(-_POW2_BIAS, _POW2_BIAS + 1, dtype=np.float64)   # 2^e as a table: no libm call


def split_activations(xp):
    """The NumPy statement of the split: xp [N, padded] float32 ->
    (pieces [N, blocks, 4, 32] int8 in input order, s0 [N, blocks] float32).

    float64 here is only a container: every value is a float32 times a power of two, computed exactly."""
    n, m = xp.shape
    blocks = xp.reshape(n, m // BLOCK, BLOCK).astype(np.float64)              # [N, B, 32]
    top = np.abs(blocks).max(axis=2)                                          # [N, B]
    e = np.full(top.shape, MIN_EXPONENT, dtype=np.int64)
    nz = top > 0
    e[nz] = np.maximum(np.ceil(np.log2(top[nz] / 127.0)).astype(np.int64), MIN_EXPONENT)
    e += top > 127.0 * np.exp2(e)                                             # log2 rounding, both ways
    lower = (e > MIN_EXPONENT) & (top <= 127.0 * np.exp2(e - 1))
    e -= lower
    s0 = np.exp2(e)                                                           # [N, B]
    rest = blocks.copy()
    pieces = np.empty((n, m // BLOCK, PIECES, BLOCK), dtype=np.int8)          # [N, B, 4, 32]
    for p in range(PIECES):
        scale = (s0 / 2.0 ** (STEP * p))[:, :, None]
        q = np.rint(rest / scale)
        pieces[:, :, p] = q
        rest = rest - q * scale
    return pieces, s0.astype(np.float32)


@njit(inline="always")
def _pow2(e):
    """2.0 ** e for integer |e| <= 200, exact."""
    return _POW2[e + _POW2_BIAS]


@njit(inline="always")
def _block_exponent(top):
    """The smallest e >= MIN_EXPONENT with top <= 127 * 2^e (top finite, >= 0)."""
    if not top > 0:
        return MIN_EXPONENT
    m, e = math.frexp(top / 127.0)           # top / 127 = m 2^e, 0.5 <= m < 1: about right
    e = max(e, MIN_EXPONENT)
    while top > 127.0 * _pow2(e):
        e += 1
    while e > MIN_EXPONENT and top <= 127.0 * _pow2(e - 1):
        e -= 1
    return e


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def split_rows(xp, seg_start, xw, xs, sumx):
    """The pieces of xp [N, padded] (plan order), as split_activations makes them, in the kernel's layout
    (module docstring), and sumx [N, S]: the float32 sum (eight running lanes, added pairwise at the end) of
    each segment's split inputs x - r (seg_start in packed words, 4 per block). Folding with that sum makes
    y exactly (x - r) @ W up to float32 rounding, so what the split drops is weighed by the true weights
    s (q - z), not by the codes alone.
    prange over (row, segment) pairs: a decode row is cut among the threads too. float64 only holds values
    that are exact (x and its remainders); dividing by a power of two is multiplying by its inverse."""
    n_rows = xp.shape[0]
    n_seg = seg_start.shape[0] - 1
    codes = xw.view(np.int8)                                              # [blocks, N, 4, 32] bytes
    for task in prange(n_rows * n_seg):
        n, s = task // n_seg, task % n_seg
        rest = np.empty(BLOCK, dtype=np.float64)                          # the block's remainders
        q = np.zeros(BLOCK, dtype=np.float64)                             # one piece, input order
        lanes = np.zeros(8, dtype=np.float32)                             # running sums of x - r
        for b in range(seg_start[s] // 4, seg_start[s + 1] // 4):
            top = 0.0
            poison = 0.0                                                  # NaN once x holds a NaN or an inf
            for i in range(BLOCK):
                v = np.float64(xp[n, b * BLOCK + i])
                rest[i] = v
                poison += v * 0.0
                top = max(top, abs(v))
            finite = poison == 0.0
            e = _block_exponent(top) if finite else MIN_EXPONENT
            if not finite:
                q[:] = 0.0                                                # every piece 0, r = x
            for p in range(PIECES):
                if finite:
                    scale = _pow2(e - STEP * p)
                    inverse = _pow2(STEP * p - e)                         # exact: both are powers of two
                    for i in range(BLOCK):
                        q[i] = np.rint(rest[i] * inverse)
                        rest[i] -= q[i] * scale
                for i0 in range(0, BLOCK, 8):                             # even inputs first, then odd
                    for t in range(4):
                        codes[b, n, p, i0 + t] = np.int8(q[i0 + 2 * t])
                        codes[b, n, p, i0 + 4 + t] = np.int8(q[i0 + 2 * t + 1])
            for i0 in range(0, BLOCK, 8):
                for t in range(8):
                    lanes[t] += np.float32(np.float64(xp[n, b * BLOCK + i0 + t]) - rest[i0 + t])  # exact: x - r
            xs[b, n, 0] = np.float32(_pow2(e - STEP)) if finite else np.float32(np.nan)
            xs[b, n, 1] = np.float32(_pow2(e - 3 * STEP)) if finite else np.float32(np.nan)
        sumx[n, s] = (((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
                      + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7])))


@intrinsic
def _split_block16(typingctx, acc_addr, w_addr, row_bytes, xw_addr, xs_addr):
    """For 16 columns: acc[0:16] += s1 * (128 t0 + t1) + s3 * (128 t2 + t3) over one block of 4 packed rows.

    acc_addr: float32 accumulators; w_addr: the block's first packed word (uint32) of the 16 columns, the next
    rows `row_bytes` further; xw_addr: the block's 4 x 8 int32 pieces; xs_addr: its s1, s3. LLVM IR because
    Numba has no vector types. Prefetches the same columns two blocks ahead, as int8.py does."""
    def codegen(context, builder, signature, args):
        acc_a, w_a, stride, xw_a, xs_a = args
        i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
        v16i = ir.VectorType(i32, 16)
        v16f = ir.VectorType(f32, 16)
        module = builder.module
        dpbusd = llvm.declare(module, "llvm.x86.avx512.vpdpbusd.512", v16i, [v16i, v16i, v16i])

        def splat(value, vty):
            return llvm.splat(builder, value, vty)

        def load(addr, ty, align):
            return llvm.load(builder, addr, ty, align)

        mask = ir.Constant(v16i, [0x0F0F0F0F] * 16)
        four = ir.Constant(v16i, [4] * 16)
        totals = [ir.Constant(v16i, [0] * 16) for _ in range(PIECES)]
        for k in range(4):                                   # 8 rows ahead = two 32-input blocks
            llvm.prefetch(builder, builder.add(w_a, builder.mul(stride, i64(8 + k))))
        for k in range(4):
            w = load(builder.add(w_a, builder.mul(stride, i64(k))), v16i, 4)
            low = builder.and_(w, mask)
            high = builder.and_(builder.lshr(w, four), mask)
            for p in range(PIECES):
                xa = load(builder.add(xw_a, i64(32 * p + 8 * k)), i32, 4)
                xb = load(builder.add(xw_a, i64(32 * p + 8 * k + 4)), i32, 4)
                totals[p] = builder.call(dpbusd, [totals[p], low, splat(xa, v16i)])
                totals[p] = builder.call(dpbusd, [totals[p], high, splat(xb, v16i)])
        seven = ir.Constant(v16i, [STEP] * 16)
        hi = builder.add(builder.shl(totals[0], seven), totals[1])
        lo = builder.add(builder.shl(totals[2], seven), totals[3])
        s1 = splat(load(xs_a, f32, 4), v16f)
        s3 = splat(load(builder.add(xs_a, i64(4)), f32, 4), v16f)
        part = builder.fadd(builder.fmul(builder.sitofp(hi, v16f), s1), builder.fmul(builder.sitofp(lo, v16f), s3))
        acc = load(acc_a, v16f, 4)
        builder.store(builder.fadd(acc, part), builder.inttoptr(acc_a, v16f.as_pointer()), align=4)
        return context.get_dummy_value()
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)
    return sig, codegen


@njit(inline="always")
def _split_rows16(acc_addr, acc_row_bytes, w_addr, row_bytes, xw_addr, xs_addr, n_rows):
    """_split_block16 for every row of the batch, rows innermost: the block's 4 x 16 words stay in L1."""
    for n in range(n_rows):
        _split_block16(acc_addr + n * acc_row_bytes, w_addr, row_bytes, xw_addr + n * 128, xs_addr + n * 8)


@njit(inline="always")
def _split_column(qw, r, j, codes, xs, acc, jj):
    """acc[n, jj] += the block's two pairs of dot products (rows r..r+3, column j) for every row n: the scalar
    form of _split_block16, for the columns past the last multiple of 16."""
    for n in range(acc.shape[0]):
        hi, lo = 0, 0
        for k in range(4):
            word = np.int64(qw[r + k, j])
            for t in range(8):
                slot = (t // 2) if t % 2 == 0 else 4 + t // 2
                q = (word >> (4 * t)) & 15
                hi += q * (np.int64(codes[r // 4, n, 0, 8 * k + slot]) * 128
                           + np.int64(codes[r // 4, n, 1, 8 * k + slot]))
                lo += q * (np.int64(codes[r // 4, n, 2, 8 * k + slot]) * 128
                           + np.int64(codes[r // 4, n, 3, 8 * k + slot]))
        acc[n, jj] += (np.float32(hi) * xs[r // 4, n, 0] + np.float32(lo) * xs[r // 4, n, 1])


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def gemv_split(qw, xw, xs, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, bounds, counter, threads,
               y):
    """y [N, out] for a 4-bit "segments" plan whose segments hold whole blocks: generic/block_decode's loops (column
    blocks taken in turn by the threads; per segment, block of 4 packed rows and 16 columns, every row's integer
    dot products while those words are in L1, then the fold of the float path per row) with this file's steps
    (_split_rows16, and _split_column past the last multiple of 16 columns). Each row's sums are added in the
    same order whatever N is."""
    decode_blocks(qw, xw, xs, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, bounds, counter,
                  threads, y, _split_rows16, _split_column)


def supports(plan):
    """A "segments" plan of 4-bit codes whose segments hold whole blocks of 32 inputs."""
    return plan.layout == "segments" and plan.bits == 4 and plan.whole_blocks


def gptq_matmul_split(plan, xp, blocks):
    """y [N, out] float32 = xp @ W for xp [N, padded] already in plan order (module docstring); blocks: the
    column bounds the threads take in turn (generic/tasks.py: guided), or an int for blocks of that size."""
    n_rows, n_padded = xp.shape
    xw = np.empty((n_padded // BLOCK, n_rows, PIECES, 8), dtype=np.int32)   # [blocks, N, 4, 8]
    xs = np.empty((n_padded // BLOCK, n_rows, 2), dtype=np.float32)         # [blocks, N, 2]
    sumx = np.empty((n_rows, len(plan.seg_group)), dtype=np.float32)        # [N, segments]
    split_rows(xp, plan.seg_start, xw, xs, sumx)
    y = np.empty((n_rows, plan.n_out), dtype=np.float32)              # [N, out]
    bounds = tasks.as_bounds(plan.n_out, blocks)                        # [blocks + 1]
    gemv_split(plan.qw, xw, xs, sumx, plan.seg_start, plan.seg_group, plan.scales, plan.qzeros, plan.zero_add,
               plan.const_zero, bounds, tasks.counter(), numba.get_num_threads(), y)
    return y
