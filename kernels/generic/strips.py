"""Column strips: where packed word (u, j) of a "segments" plan lies in memory, in either of its two layouts.

The checkpoint's qweight is row-major, qw [R, out] uint32: packed row u of every column, then row u + 1. A decode
thread that owns a block of columns walks all the packed rows of a segment at once (16 at group 128), each a
separate stream of memory; two threads make 32 streams, more than the hardware prefetchers follow when memory is
contended. So on the tiers that table.strip_width names, a layer that is copied at load anyway (act-order, sorted
by group) is copied into strips of W columns instead: strip k holds packed rows 0 .. R - 1 of columns
W k .. W k + W - 1, W * 4 bytes a row, and a thread's columns are one run of memory read front to back. W is
what the model's one-row decode reads a call: WIDE_STRIP = 64 in exact mode (avx2/gemv.py's kernel on
subnormal codes), STRIP = 32 in int8 mode (avx2/int8.py) or where the layer is not a multiple of 64 wide.

Both layouts are one 2-D array, so every kernel has one type and one formula:
    qw [S * R, W] uint32, S = out / W strips of W columns;   word (u, j) = qw[(j // W) * R + u, j % W]
The row-major layout is the case S = 1, W = out. A kernel that reads a run of columns j .. j + c - 1 with j a
multiple of c and c dividing W finds them side by side at word_offset(...), the next packed row W * 4 bytes on.

NumPy statement: to_strips below; the kernels' tests compare a strips plan with a row-major one, bit for bit.
"""

import numpy as np
from numba import njit

STRIP = 32          # columns per strip: int8 mode's one-row tile (avx2/int8.py), one qzeros word at 4 bits
WIDE_STRIP = 64     # exact mode: avx2/gemv.py's one-row call on 64 columns reads one run of memory, not two
                    # (7B layer shapes, 2 threads, Zen 4 capped to AVX2: 1.10-1.15x the same kernel on two
                    # 32-column strips)


def zeros_aligned(shape, dtype, align=64):
    """np.zeros(shape, dtype) whose first byte starts a cache line (NumPy's large arrays start 16 bytes into
    one). The decode kernels read a packed row of a strip as 32-byte vectors, several times over: at 16 bytes
    into a line every other vector straddles two lines (avx2/gemv.py's one-row kernel: 41 against 31 G weights/s
    in L2, 39 against 28 GB/s from memory on 2 threads, Zen 4 capped to AVX2)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + n].view(dtype).reshape(shape)


def to_strips(qw, width):
    """qw [R, out] row-major -> [out / width * R, width], strip by strip (NumPy; out a multiple of width)."""
    n_packed, n_out = qw.shape
    return np.ascontiguousarray(qw.reshape(n_packed, n_out // width, width).transpose(1, 0, 2)).reshape(-1, width)


def to_rows(qw, n_out):
    """The inverse of to_strips: qw [S * R, W] in either layout -> [R, out] row-major (NumPy)."""
    width = qw.shape[1]
    n_strips = n_out // width
    return np.ascontiguousarray(qw.reshape(n_strips, -1, width).transpose(1, 0, 2)).reshape(-1, n_out)


@njit(inline="always")
def shape_of(qw, n_out):
    """(W, R): columns per strip and packed rows of qw [S * R, W] for a layer of n_out columns (W is n_out, the
    row-major layout, or STRIP)."""
    width = qw.shape[1]
    return width, qw.shape[0] // (n_out // width)


@njit(inline="always")
def word_offset(width, n_packed, u, j):
    """Byte offset of word (u, j) from qw's first word; the next packed row is width * 4 bytes further. Asked
    once per tile of columns in the kernels' inner loops, so no division: the row-major layout (or the first
    strip) needs none, and a layout in strips has width STRIP or WIDE_STRIP, powers of two."""
    if j < width:
        return (u * width + j) * 4
    if width == WIDE_STRIP:
        return (((j >> 6) * n_packed + u) * WIDE_STRIP + (j & 63)) * 4
    return (((j >> 5) * n_packed + u) * STRIP + (j & 31)) * 4


@njit(inline="always")
def word(qw, n_packed, u, j):
    """Word (u, j) of qw [S * R, W] (either layout)."""
    width = qw.shape[1]
    return qw[(j // width) * n_packed + u, j % width]
