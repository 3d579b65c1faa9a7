"""The loops of the integer decode kernels, which run the activation rows innermost: vnni/split8.py (exact, four
int8 pieces per activation), vnni/int8.py and avx2/int8.py (the int8 mode). Only their dot products differ.

For a 4-bit "segments" plan whose segments hold whole blocks of 32 inputs (4 packed rows): blocks of output
columns taken in turn by the threads (tasks.py); per segment, per block of 4 packed rows, every activation row's
integer dot products with the block's codes go into a float32 accumulator per row and column, 16 columns at a
time while those words are in L1 (so a batch of N rows reads the weights from memory once), then the columns
past the last multiple of 16 one at a time; per segment, fold_rows applies scale and zero. Each row's sums are
added in the same order whatever N is, so a row's result does not depend on its batch.

A plan in column strips (generic/strips.py) runs strip by strip instead (avx2/int8.py's one-row case has a
loop of its own), all segments of one strip before the next, so a thread reads its columns as one run of
memory; each strip's fold of each segment is an LLVM intrinsic (_fold32) with fold_rows' float32 steps. A plan
in strips has whole strips of 32 or 64 columns, so no column takes the scalar step. Each output's sums are the
same, in the same order, bit for bit.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import strips, tasks
from .. import llvm
from .gptq_gemv import _zero_code, fold_rows


@njit(inline="always")
def decode_blocks(qw, xw, xs, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, bounds, counter,
                  threads, y, columns16, column):
    """y [N, out] for qw [S * R, W] uint32 (4-bit codes, either layout of generic/strips.py), the activations of
    the kernel's own layout xw [blocks, N, ...] int32 (int8 codes packed in fours) and xs [blocks, N, ...]
    float32 (their scales), sumx [N, S], and the plan's segments (seg_start in packed rows, multiples of 4),
    scales, zeros; output columns bounds[b] .. bounds[b + 1] taken in turn by `threads` threads (tasks.py;
    counter [1] int64 starts at zero).

    The kernel's two steps, per block of 4 packed rows r..r+3 (block index r // 4):
        columns16(acc_addr, acc_row_bytes, w_addr, row_bytes, x_addr, s_addr, n_rows): 16 columns, every row:
            acc rows acc_row_bytes apart, packed words at w_addr (rows row_bytes apart), the block's row 0 of xw
            at x_addr and of xs at s_addr (an intrinsic, or an inline function calling one per row);
        column(qw, r, j, codes, xs, acc, jj): column j of qw into acc[:, jj] for every row, codes the bytes of xw
            (row-major qw: only the last columns of a block that are not a whole 16 take it, and a plan in strips
            has whole strips of 32 or 64, table.strip_width).

    Inlined (Numba IR, before typing) into the kernel that calls it, with the kernel's compile flags, so the
    steps are called directly and the kernel is cached with its own file; a factory closing over the steps
    would not be: Numba keys a closure's cache on its pickled cells, and an intrinsic pickles with a fresh uuid
    in every process."""
    n_rows = xw.shape[1]
    n_out = y.shape[1]
    width, n_packed = strips.shape_of(qw, n_out)
    row_bytes = width * 4
    base_w = np.int64(qw.ctypes.data)
    base_x, base_s = np.int64(xw.ctypes.data), np.int64(xs.ctypes.data)
    x_block, s_block = np.int64(xw.strides[0]), np.int64(xs.strides[0])
    codes = xw.view(np.int8)                                              # [blocks, N, ...] bytes
    for _worker in prange(min(threads, bounds.shape[0] - 1)):          # one task loop per thread
        while True:
            j0, bw = tasks.take(counter, bounds)
            if j0 < 0:
                break
            vec = bw // 16 * 16
            acc = np.zeros((n_rows, width if width < bw else bw), dtype=np.float32)   # [N, strip or task width]
            zbuf = np.empty(bw, dtype=np.float32)
            base_acc = np.int64(acc.ctypes.data)
            for n in range(n_rows):
                y[n, j0:j0 + bw] = 0.0
            if width < bw:                      # strips: strip by strip, each one run of memory
                for c in range(0, bw, width):
                    cw = min(width, bw - c)         # a block may end in the middle of a strip of 64
                    for s in range(seg_group.shape[0]):
                        for r in range(seg_start[s], seg_start[s + 1], 4):
                            x_a, s_a = base_x + (r // 4) * x_block, base_s + (r // 4) * s_block
                            for jj in range(c, c + cw, 16):
                                columns16(base_acc + (jj - c) * 4, width * 4,
                                          base_w + strips.word_offset(width, n_packed, r, j0 + jj), row_bytes, x_a,
                                          s_a, n_rows)
                        _fold_strip(y, acc, s, seg_group[s], j0 + c, cw, scales, qzeros, zero_add, const_zero,
                                    sumx, zbuf)
                continue
            for s in range(seg_group.shape[0]):
                for r in range(seg_start[s], seg_start[s + 1], 4):    # row-major: every 16 columns of the task
                    x_a, s_a = base_x + (r // 4) * x_block, base_s + (r // 4) * s_block
                    for jj in range(0, vec, 16):
                        columns16(base_acc + jj * 4, bw * 4,
                                  base_w + strips.word_offset(width, n_packed, r, j0 + jj), row_bytes, x_a, s_a,
                                  n_rows)
                    for j in range(vec, bw):
                        column(qw, r, j0 + j, codes, xs, acc, j)
                fold_rows(y, acc, s, seg_group[s], j0, bw, scales, qzeros, 4, zero_add, const_zero, sumx, zbuf)


@njit(inline="always")
def _fold_strip(y, acc, s, g, j0, width, scales, qzeros, zero_add, const_zero, sumx, zbuf):
    """fold_rows for `width` columns (32 or 64) of one strip from j0, acc [N, strip width] (cleared for the next
    segment): one _fold32 per row and 32 columns, inlined into the kernel. A call to fold_rows per strip and
    segment, or Numba slices of y and acc, cost as much as the strip's dot products (their reference counts are
    atomic)."""
    if const_zero < 0:
        for j in range(width):
            zbuf[j] = np.float32((_zero_code(qzeros[g], j0 + j, 4, qzeros.shape[1]) + zero_add) & 15)
    for c in range(0, width, 32):
        sc_a = np.int64(scales.ctypes.data) + (g * scales.shape[1] + j0 + c) * 2
        z_a = np.int64(zbuf.ctypes.data) + c * 4
        for n in range(acc.shape[0]):
            y_a = np.int64(y.ctypes.data) + (n * y.shape[1] + j0 + c) * 4
            acc_a = np.int64(acc.ctypes.data) + (n * acc.shape[1] + c) * 4
            if const_zero >= 0:
                _fold32_const(y_a, acc_a, sc_a, z_a, np.float32(const_zero), sumx[n, s])
            else:
                _fold32_zeros(y_a, acc_a, sc_a, z_a, np.float32(const_zero), sumx[n, s])


def zeros8_ir(builder, z_a, c, zero_add):
    """LLVM IR: the true zeros of columns 8c .. 8c + 7 as <8 x float>, from 4-bit qzeros word c of the row at
    z_a: (code + zero_add) & 15, what _zero_code and fold_rows give, by vector shifts."""
    v8i = llvm.vec(llvm.I32, 8)
    word = llvm.splat(builder, llvm.load(builder, llvm.offset(builder, z_a, 4 * c), llvm.I32), v8i)
    codes = builder.lshr(word, ir.Constant(v8i, [4 * k for k in range(8)]))
    add = llvm.splat(builder, builder.trunc(zero_add, llvm.I32), v8i)
    return builder.sitofp(builder.and_(builder.add(codes, add), ir.Constant(v8i, [15] * 8)), llvm.vec(llvm.F32, 8))


def fold8_ir(builder, acc, z_term, sc_a, y_a):
    """LLVM IR: y[0:8] += s * (acc - z_term) for the 8 float32 at y_a and the 8 fp16 scales at sc_a: fold_rows'
    float32 steps (z_term is z * sum_x, or the one product of a layer's constant zero), each instruction with
    the fast-math flags those fastmath=True loops carry, so LLVM fuses them the same way and the bits are
    theirs (tests/test_kernels_strips.py compares with fold_rows)."""
    fast = ("fast",)
    d = builder.fsub(acc, z_term, flags=fast)
    sc = llvm.f16_to_f32(builder, llvm.load(builder, sc_a, llvm.vec(llvm.I16, 8)))
    y = llvm.load(builder, y_a, acc.type)
    llvm.store(builder, builder.fadd(y, builder.fmul(sc, d, flags=fast), flags=fast), y_a)


def _fold32(const):
    """An intrinsic for 32 columns: y += s * (acc - z * sum_x), then acc = 0, by fold8_ir: the steps of
    gptq_gemv._fold_segment (z from the float32 row at z_a) or, const, of _fold_segment_const_zero (z * sum_x
    once, z = const_zero)."""
    @intrinsic
    def fold32(typingctx, y_a, acc_a, sc_a, z_a, const_zero, sum_x):
        def codegen(context, builder, signature, args):
            y_a, acc_a, sc_a, z_a, cz, sx = args
            fast = ("fast",)
            v8f = llvm.vec(llvm.F32, 8)
            sx8 = llvm.splat(builder, sx, v8f)
            z_sum = llvm.splat(builder, builder.fmul(cz, sx, flags=fast), v8f)
            for c in range(4):
                acc = llvm.load(builder, llvm.offset(builder, acc_a, 32 * c), v8f)
                if const:
                    z_term = z_sum
                else:
                    z_term = builder.fmul(llvm.load(builder, llvm.offset(builder, z_a, 32 * c), v8f), sx8, flags=fast)
                fold8_ir(builder, acc, z_term, llvm.offset(builder, sc_a, 16 * c), llvm.offset(builder, y_a, 32 * c))
                llvm.store(builder, ir.Constant(v8f, [0.0] * 8), llvm.offset(builder, acc_a, 32 * c))
            return context.get_dummy_value()
        return types.void(types.intp, types.intp, types.intp, types.intp, types.float32, types.float32), codegen
    return fold32


_fold32_const, _fold32_zeros = _fold32(True), _fold32(False)
