"""The loops of the integer decode kernels that run the activation rows innermost: vnni/split8.py (exact, four
int8 pieces per activation) and avx2/int8.py (the int8 mode on AVX2). Only their dot products differ.

For a 4-bit "segments" plan whose segments hold whole blocks of 32 inputs (4 packed rows): prange over blocks of
output columns; per segment, per block of 4 packed rows, every activation row's integer dot products with the
block's codes go into a float32 accumulator per row and column, 16 columns at a time while those words are in
L1 (so a batch of N rows reads the weights from memory once), then the columns past the last multiple of 16 one
at a time; per segment, fold_rows applies scale and zero. Each row's sums are added in the same order whatever N
is, so a row's result does not depend on its batch. A plan in column strips (generic/strips.py) runs strip by
strip within each segment (the segment's packed rows of one strip are one run of memory; a plan in strips has
whole strips of 32 columns, so no column takes the scalar step); each output's sums are the same, in the same
order.
"""

import numpy as np
from numba import njit, prange

from . import strips
from .. import llvm
from .gptq_gemv import fold_rows


@njit(inline="always")
def decode_blocks(qw, xw, xs, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, block, y,
                  columns16, column):
    """y [N, out] for qw [S * R, W] uint32 (4-bit codes, either layout of generic/strips.py), the activations of
    the kernel's own layout xw [blocks, N, ...] int32 (int8 codes packed in fours) and xs [blocks, N, ...] float32 (their scales), sumx [N, S], and the
    plan's segments (seg_start in packed rows, multiples of 4), scales, zeros; `block` output columns per task.

    The kernel's two steps, per block of 4 packed rows r..r+3 (block index r // 4):
        columns16(acc_addr, acc_row_bytes, w_addr, row_bytes, x_addr, s_addr, n_rows): 16 columns, every row:
            acc rows acc_row_bytes apart, packed words at w_addr (rows row_bytes apart), the block's row 0 of xw
            at x_addr and of xs at s_addr (an intrinsic, or an inline function calling one per row);
        column(qw, r, j, codes, xs, acc, jj): column j of qw into acc[:, jj] for every row, codes the bytes of xw
            (row-major qw: only the last columns of a block that are not a whole 16 take it, and a plan in strips
            has whole strips of 32, table.strips_for).

    Inlined (Numba IR, before typing) into the kernel that calls it, with the kernel's compile flags, so the
    steps are called directly and the kernel is cached with its own file; a factory closing over the steps
    would not be: Numba keys a closure's cache on its pickled cells, and an intrinsic pickles with a fresh uuid
    in every process."""
    n_rows = xw.shape[1]
    n_out = y.shape[1]
    width, n_packed = strips.shape_of(qw, n_out)
    row_bytes = width * 4
    n_blocks = (n_out + block - 1) // block
    base_w = np.int64(qw.ctypes.data)
    base_x, base_s = np.int64(xw.ctypes.data), np.int64(xs.ctypes.data)
    x_block, s_block = np.int64(xw.strides[0]), np.int64(xs.strides[0])
    codes = xw.view(np.int8)                                              # [blocks, N, ...] bytes
    for b in prange(n_blocks):
        j0 = b * block
        bw = min(n_out, j0 + block) - j0
        vec = bw // 16 * 16
        acc = np.zeros((n_rows, bw), dtype=np.float32)                    # [N, width]
        zbuf = np.empty(bw, dtype=np.float32)
        base_acc = np.int64(acc.ctypes.data)
        for n in range(n_rows):
            y[n, j0:j0 + bw] = 0.0
        for s in range(seg_group.shape[0]):
            if width >= bw:                 # row-major: per block of 4 packed rows, every 16 columns of the task
                for r in range(seg_start[s], seg_start[s + 1], 4):
                    x_a, s_a = base_x + (r // 4) * x_block, base_s + (r // 4) * s_block
                    for jj in range(0, vec, 16):
                        columns16(base_acc + jj * 4, bw * 4, base_w + strips.word_offset(width, n_packed, r, j0 + jj),
                                  row_bytes, x_a, s_a, n_rows)
                    for j in range(vec, bw):
                        column(qw, r, j0 + j, codes, xs, acc, j)
            else:                           # strips: per strip, the segment's packed rows (one run of memory),
                for c in range(0, bw, width):   # while the same rows of the next strip are asked for
                    for r in range(seg_start[s], seg_start[s + 1], 4):
                        if c + width < bw:
                            ahead = base_w + strips.word_offset(width, n_packed, r, j0 + c + width)
                            for line in range(0, 4 * row_bytes, 64):
                                llvm.prefetch_line(ahead + line)
                        x_a, s_a = base_x + (r // 4) * x_block, base_s + (r // 4) * s_block
                        for jj in range(c, c + width, 16):
                            columns16(base_acc + jj * 4, bw * 4,
                                      base_w + strips.word_offset(width, n_packed, r, j0 + jj), row_bytes, x_a, s_a,
                                      n_rows)
            fold_rows(y, acc, s, seg_group[s], j0, bw, scales, qzeros, 4, zero_add, const_zero, sumx, zbuf)
