"""Exact decode on AVX2: kernels/vnni/split8.py's four int8 pieces, dot products on vpmaddubsw/vpmaddwd.

What it computes is split8's, unchanged (its module docstring has the split and the error bound): x is split
per block of 32 inputs into four int8 pieces on power-of-two scales by vnni.split8.split_rows (the same
function, the same layout), and per block b, column j,
    acc_j += s1 * float32(128 t0_j + t1_j)  +  s3 * float32(128 t2_j + t3_j)
with t_p the exact integer dot product of piece p with the codes; then the float path's fold per segment.
Only the integer dot products differ: VNNI's vpdpbusd is replaced by vpmaddubsw + vpmaddwd (maddubs.py: the
int16 sums of a block are at most 8 * 2 * 15 * 127 = 30480 <= 32767, so nothing saturates or wraps). The
integer sums are equal, the float32 steps after them are the same instructions in the same order, so y is
bit for bit vnni.split8.gemv_split's on the same inputs (tests/test_kernels_avx2_decode.py).

Register budget, per half of 16 columns (8 columns, one ymm): the block's 8 code vectors (even and odd
bytes of 4 packed rows, decoded once for all rows), 4 int16 accumulators (one per piece), 2 broadcast
activation words: 14 of the 16 ymm registers (LLVM spills one). Per row and 256 weights (32 inputs x 8
columns): 32 vpmaddubsw, 28 vpaddw, 4 vpmaddwd, 32 broadcasts (loads) and the fold, 116 instructions (the
float GEMV: 134, all of them per row). The two halves run one after the other: both at once would need
16 code vectors and 8 accumulators.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import llvm
from ..generic.gptq_gemv import fold_rows
from ..llvm import F32, I64, vec
from ..vnni.split8 import BLOCK, PIECES, STEP, split_rows
from .maddubs import V8I, code_bytes, dot_block

PREFETCH_BLOCKS = 2        # the same 16 columns this many blocks ahead are asked for (as vnni/split8.py does)


@intrinsic
def _split_rows16(typingctx, acc_addr, acc_row_bytes, w_addr, row_bytes, xw_addr, xs_addr, n_rows):
    """For 16 columns, one block of 4 packed rows and every row n of the batch:
        acc[n, 0:16] += s1_n * (128 t0 + t1) + s3_n * (128 t2 + t3)
    acc_addr: row 0's float32 accumulators, the next rows `acc_row_bytes` further; w_addr: the block's first
    packed word of the 16 columns, the next packed rows `row_bytes` further; xw_addr, xs_addr: row 0's
    4 x 8 int32 pieces and its s1, s3, the next rows 128 and 8 bytes further (the [blocks, N, ...] layout).
    Each half of 8 columns decodes the block's codes once (8 registers) and runs every row over them, so a
    row costs only its vpmaddubsw/vpaddw/vpmaddwd and fold (116 instructions per 256 weights, haswell
    target, of which 34 are broadcasts from L1). Asks for the same columns PREFETCH_BLOCKS blocks ahead,
    as vnni/split8.py does. LLVM IR because Numba has no vector types."""
    def codegen(context, builder, signature, args):
        acc_a, acc_stride, w_a, stride, xw_a, xs_a, rows = args
        v8f = vec(F32, 8)
        for k in range(4 * PREFETCH_BLOCKS, 4 * PREFETCH_BLOCKS + 4):
            llvm.prefetch(builder, builder.add(w_a, builder.mul(stride, I64(k))))
        seven = ir.Constant(V8I, [STEP] * 8)
        for h in range(2):                                                      # 8 columns each
            codes = code_bytes(builder, llvm.offset(builder, w_a, 32 * h), stride)
            with cgutils.for_range(builder, rows) as loop:
                n = loop.index
                xs_n = builder.add(xs_a, builder.mul(n, I64(8)))
                t = dot_block(builder, codes, builder.add(xw_a, builder.mul(n, I64(128))), PIECES)
                s1 = llvm.splat(builder, llvm.load(builder, xs_n, F32), v8f)
                s3 = llvm.splat(builder, llvm.load(builder, llvm.offset(builder, xs_n, 4), F32), v8f)
                hi = builder.add(builder.shl(t[0], seven), t[1])                    # |.| < 2^24: exact
                lo = builder.add(builder.shl(t[2], seven), t[3])
                part = builder.fadd(builder.fmul(builder.sitofp(hi, v8f), s1),
                                    builder.fmul(builder.sitofp(lo, v8f), s3))
                addr = builder.add(acc_a, builder.add(builder.mul(n, acc_stride), I64(32 * h)))
                llvm.store(builder, builder.fadd(llvm.load(builder, addr, v8f), part), addr)
        return context.get_dummy_value()
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp, types.intp, types.intp)
    return sig, codegen


def gemv_split_numpy(codes, pieces, s0):
    """The NumPy statement of the kernel's accumulator for one segment of unit scales and zero 0:
    codes [in, out] int (0..15), pieces [N, B, 4, 32] int8 and s0 [N, B] (vnni.split8.split_activations)
    -> acc [N, out] float32, every float32 step in the kernel's order; the integer sums in int64."""
    n_rows, n_blocks = s0.shape
    acc = np.zeros((n_rows, codes.shape[1]), dtype=np.float32)                # [N, out]
    for n in range(n_rows):
        for b in range(n_blocks):
            t = pieces[n, b].astype(np.int64) @ codes[32 * b:32 * b + 32].astype(np.int64)   # [4, out] exact
            hi = (128 * t[0] + t[1]).astype(np.float32)                        # exact: below 2^24
            lo = (128 * t[2] + t[3]).astype(np.float32)
            s1 = np.float32(np.float64(s0[n, b]) / 2.0 ** STEP)
            s3 = np.float32(np.float64(s0[n, b]) / 2.0 ** (3 * STEP))
            acc[n] = acc[n] + (hi * s1 + lo * s3)
    return acc


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def gemv_split(qw, xw, xs, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, block, y):
    """vnni.split8.gemv_split on AVX2 (same arguments, same result bit for bit): prange over column blocks;
    per segment, block of 4 packed rows and 16 columns, every row's integer dot products on codes decoded
    once (_split_rows16: rows innermost, so N rows read the weights from memory once), then the fold per
    row. Columns past the last multiple of 16 of a block take split8's scalar loop."""
    n_rows = xw.shape[1]
    n_out = qw.shape[1]
    row_bytes = n_out * 4
    n_blocks = (n_out + block - 1) // block
    base_w = np.int64(qw.ctypes.data)
    base_x, base_s = np.int64(xw.ctypes.data), np.int64(xs.ctypes.data)
    codes = xw.view(np.int8)                                              # [blocks, N, 4, 32]
    for b in prange(n_blocks):
        j0 = b * block
        width = min(n_out, j0 + block) - j0
        vec16 = width // 16 * 16
        acc = np.zeros((n_rows, width), dtype=np.float32)                 # [N, width]
        zbuf = np.empty(width, dtype=np.float32)
        base_acc = np.int64(acc.ctypes.data)
        for n in range(n_rows):
            y[n, j0:j0 + width] = 0.0
        for s in range(seg_group.shape[0]):
            for r in range(seg_start[s], seg_start[s + 1], 4):
                w_row = base_w + r * row_bytes + j0 * 4
                x_blk = (r // 4) * n_rows
                for jj in range(0, vec16, 16):
                    _split_rows16(base_acc + jj * 4, width * 4, w_row + jj * 4, row_bytes, base_x + x_blk * 128,
                                  base_s + x_blk * 8, n_rows)
                for j in range(vec16, width):
                    for n in range(n_rows):
                        hi, lo = 0, 0
                        for k in range(4):
                            word = np.int64(qw[r + k, j0 + j])
                            for t in range(8):
                                slot = (t // 2) if t % 2 == 0 else 4 + t // 2
                                q = (word >> (4 * t)) & 15
                                hi += q * (np.int64(codes[r // 4, n, 0, 8 * k + slot]) * 128
                                           + np.int64(codes[r // 4, n, 1, 8 * k + slot]))
                                lo += q * (np.int64(codes[r // 4, n, 2, 8 * k + slot]) * 128
                                           + np.int64(codes[r // 4, n, 3, 8 * k + slot]))
                        acc[n, j] += (np.float32(hi) * xs[r // 4, n, 0] + np.float32(lo) * xs[r // 4, n, 1])
            fold_rows(y, acc, s, seg_group[s], j0, width, scales, qzeros, 4, zero_add, const_zero, sumx, zbuf)


def supports(plan):
    """vnni.split8.supports: a "segments" plan of 4-bit codes whose segments hold whole blocks of 32."""
    return plan.layout == "segments" and plan.bits == 4 and plan.whole_blocks


def gptq_matmul_split(plan, xp, block):
    """y [N, out] float32 = xp @ W for xp [N, padded] already in plan order: vnni.split8.gptq_matmul_split's
    contract and result, for CPUs with AVX2 (supports(plan) must hold)."""
    n_rows, n_padded = xp.shape
    xw = np.empty((n_padded // BLOCK, n_rows, PIECES, 8), dtype=np.int32)   # [blocks, N, 4, 8]
    xs = np.empty((n_padded // BLOCK, n_rows, 2), dtype=np.float32)         # [blocks, N, 2]
    sumx = np.empty((n_rows, len(plan.seg_group)), dtype=np.float32)        # [N, segments]
    split_rows(xp, plan.seg_start, xw, xs, sumx)
    y = np.empty((n_rows, plan.qw.shape[1]), dtype=np.float32)              # [N, out]
    gemv_split(plan.qw, xw, xs, sumx, plan.seg_start, plan.seg_group, plan.scales, plan.qzeros, plan.zero_add,
               plan.const_zero, block, y)
    return y
