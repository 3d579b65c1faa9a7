"""Opt-in, NOT exact: the int8 mode's decode GEMV (kernels/vnni/int8.py) on AVX2's vpmaddubsw/vpmaddwd.

What it computes is vnni/int8.py's, unchanged (its module docstring says why and how much it rounds):
activations rounded to int8 per block of 32 inputs by vnni.int8_gemm.quantize_rows (the same function and
layout), and per block b, column j,
    acc_j += d_b * float32(sum_{i in b} xq_i * q_ij)                 (one exact integer sum per block)
then the float path's fold per segment, y_j += s_j (acc_j - z_j sum_i d_b xq_i). The integer sum is
vpdpbusd's there and vpmaddubsw + vpmaddwd's here (maddubs.py: |xq| <= 127, so a block's int16 sums are
at most 8 * 2 * 15 * 127 = 30480 <= 32767 and exact), the float32 steps after it are the same instructions
in the same order, so y is bit for bit vnni.int8.gemv_int8's on the same inputs.

The rows are the inner loop, as in vnni/int8.py and vnni/split8.py (all run the loops of
generic/block_decode.py): a batch of N rows reads each block of packed words from memory once.

One row on a plan in column strips (generic/strips.py, the avx2 tier's act-order layers) takes its own loop,
_one_row_strips: per strip of 32 columns and segment, one intrinsic keeps the 4 accumulators in registers over
all the segment's blocks and folds them there, with the same float32 steps in the same order, so the same bits.
In cache it runs 2-3x faster than decode_blocks' steps (their acc round trip through memory per block and
scalar zeros); from memory a 7B layer's seven matmuls at 2 threads took 3.0-3.3 ms against 3.7-4.0 (capped
AVX2 on Zen 4, one process; a parallel sum read the same bytes in 2.9-3.1 ms).

Register budget, per half of 16 columns (8 columns, one ymm): the block's 8 code vectors (decoded once for
all rows), 1 int16 accumulator, 2 broadcast activation words: 11 of the 16 ymm registers. Per row and 256
weights: 8 vpmaddubsw, 7 vpaddw, 1 vpmaddwd, 8 broadcasts (loads) and the fold.
"""

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import llvm
from ..generic import strips, tasks
from ..generic.block_decode import decode_blocks, fold8_ir, zeros8_ir
from ..llvm import F32, I64, vec
from ..vnni.int8 import int8_column
from ..vnni.int8_gemm import round_activations
from .maddubs import code_bytes, dot_block, dot_strip

PREFETCH_BLOCKS = 2        # the same 16 columns this many blocks ahead are asked for (as vnni/int8.py does)


@intrinsic
def _int8_rows16(typingctx, acc_addr, acc_row_bytes, w_addr, row_bytes, xw_addr, xscale_addr, n_rows):
    """For 16 columns, one block of 4 packed rows and every row n of the batch:
        acc[n, 0:16] += d_n * sum over the block of (int8 x_n) . (4-bit codes)
    acc_addr: row 0's float32 accumulators, the next rows `acc_row_bytes` further; w_addr: the block's first
    packed word of the 16 columns, the next packed rows `row_bytes` further; xw_addr: row 0's 8 int32 (int8
    activations packed in fours: inputs 0,2,4,6 | 1,3,5,7 of each word), the next rows 32 bytes further;
    xscale_addr: row 0's block scale d (float32), the next rows 4 bytes further. Each half of 8 columns
    decodes the block's codes once and runs every row over them; asks for the same columns PREFETCH_BLOCKS
    blocks ahead, as vnni/int8.py does. LLVM IR because Numba has no vector types."""
    def codegen(context, builder, signature, args):
        acc_a, acc_stride, w_a, stride, xw_a, xsc_a, rows = args
        v8f = vec(F32, 8)
        for k in range(4 * PREFETCH_BLOCKS, 4 * PREFETCH_BLOCKS + 4):
            llvm.prefetch(builder, builder.add(w_a, builder.mul(stride, I64(k))))
        for h in range(2):                                                      # 8 columns each
            codes = code_bytes(builder, llvm.offset(builder, w_a, 32 * h), stride)
            with cgutils.for_range(builder, rows) as loop:
                n = loop.index
                t = dot_block(builder, codes, builder.add(xw_a, builder.mul(n, I64(32))), 1)   # [1] int32
                d = llvm.splat(builder, llvm.load(builder, builder.add(xsc_a, builder.mul(n, I64(4))), F32), v8f)
                addr = builder.add(acc_a, builder.add(builder.mul(n, acc_stride), I64(32 * h)))
                scaled = builder.fmul(builder.sitofp(t[0], v8f), d)
                llvm.store(builder, builder.fadd(llvm.load(builder, addr, v8f), scaled), addr)
        return context.get_dummy_value()
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp, types.intp, types.intp)
    return sig, codegen


def gemv_int8_numpy(codes, xq, d):
    """The NumPy statement of the kernel's accumulator for one segment of unit scales and zero 0:
    codes [in, out] int (0..15), xq [N, in] int8 and d [N, B] float32 (the rounded activations and their
    block scales) -> acc [N, out] float32; the integer sums in int64, one multiply-add per block in float32
    (the kernel is compiled with fastmath, whose contraction makes acc + d * float(t) one rounding: computed
    here in float64, where the product is exact and the sum is rounded once to float32 unless it falls within
    2^-29 of a float32 tie, which the tests' data does not hit)."""
    n_rows, n_blocks = d.shape
    acc = np.zeros((n_rows, codes.shape[1]), dtype=np.float32)                # [N, out]
    for n in range(n_rows):
        for b in range(n_blocks):
            t = xq[n, 32 * b:32 * b + 32].astype(np.int64) @ codes[32 * b:32 * b + 32].astype(np.int64)
            acc[n] = (acc[n].astype(np.float64) + np.float64(d[n, b]) * t.astype(np.float32)).astype(np.float32)
    return acc


def _strip_one_row(const):
    """An intrinsic for one activation row, one segment and one strip of 32 columns (generic/strips.py):
        acc[0:32] = sum over the segment's blocks b of d_b * float32(sum_{i in b} xq_i * q_ij)
        y[0:32] += s_j * (acc_j - z_j * sum_x)
    the sums and steps of _int8_rows16 then block_decode's fold (fold8_ir; const: every zero is const_zero), in
    the same order with the same float32 instructions, so the bits are decode_blocks'. The 4 accumulators of 8
    columns stay in registers over the segment (llvm.sum_loop), and the 32 zeros are unpacked from their 4
    qzeros words with vector shifts (zeros8_ir): with one row, decode_blocks' acc round trip through memory per
    block and its scalar zeros cost a tenth of the layer.

    y_a: y at the strip's first column; w_a: the segment's first packed word of the strip (the next packed rows
    w_st bytes further); n_blocks blocks of 4 packed rows;
    x_a, d_a: the segment's first block of xw and xscale (the next blocks x_st, d_st bytes further); sc_a: the
    group's fp16 scales of the strip; z_a: its first qzeros word; zero_add, const_zero, sum_x as fold_rows.
    Register budget (16 ymm): 4 float32 accumulators, 4 int16 sums, 2 broadcast activation words, 2 code
    vectors (maddubs.dot_strip), the block scale, the nibble mask.
    No software prefetch: a strip is one run of memory, which the hardware prefetchers follow; asking for each
    block 0.5-4 KB ahead made a 7B layer 8-12% slower (capped AVX2 on Zen 4, quiet host)."""
    @intrinsic
    def strip(typingctx, y_a, w_a, w_st, n_blocks, x_a, x_st, d_a, d_st, sc_a, z_a, zero_add, const_zero, sum_x):
        def codegen(context, builder, signature, args):
            y_a, w_a, w_st, n_blocks, x_a, x_st, d_a, d_st, sc_a, z_a, zero_add, cz, sx = args
            fast = ("fast",)
            v8f = vec(F32, 8)

            def block(b, acc):                                                  # one block of 4 packed rows
                w_blk = builder.add(w_a, builder.mul(b, builder.mul(w_st, I64(4))))
                x_b = builder.add(x_a, builder.mul(b, x_st))
                d = llvm.splat(builder, llvm.load(builder, builder.add(d_a, builder.mul(b, d_st)), F32), v8f)
                t = dot_strip(builder, w_blk, w_st, x_b, 4)                     # 4 x 8 columns
                return [builder.fadd(acc[h], builder.fmul(builder.sitofp(t[h], v8f), d)) for h in range(4)]

            done = llvm.sum_loop(builder, n_blocks, 4, v8f, block, "blocks")
            sx8 = llvm.splat(builder, sx, v8f)
            z_sum = llvm.splat(builder, builder.fmul(cz, sx, flags=fast), v8f)
            for c in range(4):
                z_term = z_sum if const else builder.fmul(zeros8_ir(builder, z_a, c, zero_add), sx8, flags=fast)
                fold8_ir(builder, done[c], z_term, llvm.offset(builder, sc_a, 16 * c),
                         llvm.offset(builder, y_a, 32 * c))
            return context.get_dummy_value()
        sig = types.void(*([types.intp] * 11), types.float32, types.float32)
        return sig, codegen
    return strip


_strip_const, _strip_zeros = _strip_one_row(True), _strip_one_row(False)


@njit(inline="always")
def _one_row_strips(qw, xw, xscale, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, bounds,
                    counter, threads, y):
    """One activation row on a plan in strips: column blocks taken in turn by the threads (generic/tasks.py);
    per strip, per segment, one _strip_one_row (the accumulators in registers over the segment, then the
    fold)."""
    n_out = y.shape[1]
    width, n_packed = strips.shape_of(qw, n_out)
    w_st = np.int64(width * 4)
    base_w, base_x, base_d = np.int64(qw.ctypes.data), np.int64(xw.ctypes.data), np.int64(xscale.ctypes.data)
    base_y, base_sc, base_z = np.int64(y.ctypes.data), np.int64(scales.ctypes.data), np.int64(qzeros.ctypes.data)
    x_st, d_st = np.int64(xw.strides[0]), np.int64(xscale.strides[0])
    sc_st, z_st = scales.shape[1] * 2, qzeros.shape[1] * 4
    cz = np.float32(const_zero)
    for _worker in prange(min(threads, bounds.shape[0] - 1)):          # one task loop per thread
        while True:
            j0, bw = tasks.take(counter, bounds)
            if j0 < 0:
                break
            y[0, j0:j0 + bw] = 0.0
            for c in range(j0, j0 + bw, strips.STRIP):          # 32 columns a call (half a 64-column strip)
                for s in range(seg_group.shape[0]):
                    u0, g = seg_start[s], seg_group[s]
                    w_a = base_w + strips.word_offset(width, n_packed, u0, c)
                    x_a, d_a = base_x + (u0 // 4) * x_st, base_d + (u0 // 4) * d_st
                    sc_a, z_a = base_sc + g * sc_st + c * 2, base_z + g * z_st + (c // 8) * 4
                    nb = (seg_start[s + 1] - u0) // 4
                    if cz >= 0:
                        _strip_const(base_y + c * 4, w_a, w_st, nb, x_a, x_st, d_a, d_st, sc_a, z_a, zero_add, cz,
                                     sumx[0, s])
                    else:
                        _strip_zeros(base_y + c * 4, w_a, w_st, nb, x_a, x_st, d_a, d_st, sc_a, z_a, zero_add, cz,
                                     sumx[0, s])


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def gemv_int8(qw, xw, xscale, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, bounds, counter,
              threads, y):
    """vnni.int8.gemv_int8 on AVX2 (same arguments, same result bit for bit), rows innermost: generic/
    block_decode's loops (prange over column blocks; per segment, block of 4 packed rows and 16 columns, every
    row's integer dot product on codes decoded once, then the fold per row) with this file's steps
    (_int8_rows16, and vnni/int8.py's int8_column past the last multiple of 16 columns); one row on a plan in
    strips runs _one_row_strips instead (same bits). xw [blocks, N, 8] int32, xscale [blocks, N], sumx [N, S]
    from quantize_rows."""
    if xw.shape[1] == 1 and qw.shape[1] < y.shape[1]:
        _one_row_strips(qw, xw, xscale, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero,
                        bounds, counter, threads, y)
    else:
        decode_blocks(qw, xw, xscale, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, bounds,
                      counter, threads, y, _int8_rows16, int8_column)


def supports(plan):
    """vnni.int8.supports: 4-bit codes and segments of whole 32-input blocks."""
    return plan.bits == 4 and plan.whole_blocks


def gptq_matmul_int8(plan, xp, y, blocks):
    """y [N, out] = x_hat @ W with x_hat the int8-rounded activations (xp [N, padded] already in plan order):
    vnni.int8.gptq_matmul_int8's contract and result, for CPUs with AVX2 (supports(plan) must hold); blocks:
    the column bounds the threads take in turn (generic/tasks.py: guided), or an int for blocks of that size."""
    xw, xscale, sumx, _ = round_activations(plan, xp)
    bounds = tasks.as_bounds(plan.n_out, blocks)                        # [blocks + 1]
    gemv_int8(plan.qw, xw, xscale, sumx, plan.seg_start, plan.seg_group, plan.scales, plan.qzeros,
              plan.zero_add, plan.const_zero, bounds, tasks.counter(), numba.get_num_threads(), y)
    return y
