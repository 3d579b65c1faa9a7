"""Prefill: dequantize slabs of the "segments" layout (kernels/gptq.py) to float32 for BLAS.

More than GEMV_MAX_ROWS activation rows amortize a float32 copy of a slab of columns (never the whole matrix):
each thread dequantizes its own slab into its own scratch and multiplies it with single-threaded BLAS
(kernels/generic/slabs.py says why). The arithmetic per weight is the reference's: s * (q - z) in float32.
"""

import numpy as np
from numba import njit, prange

from .dequantize import dequantize_code_rows
from .gptq_gemv import _zero_code
from .gptq_passes import unit_shape
from .half import f16_to_f32

STRIP = 256     # columns decoded together: wide enough to amortize the per-row work of dequantize_code_rows


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def _dequantize_strip(qw, seg_start, seg_group, scales, qzeros, bits, zero_add, u0, u1, c0, cw, tile, lo):
    """tile[t, lo + j] = W_sorted[u0 * codes_per_unit + t, c0 + j] for one strip of cw columns.

    The strip's scales and zeros are widened once per segment into small buffers, then every code row of
    the segment is decoded by kernels/generic/dequantize.py with the column loop innermost.
    """
    unit_codes = unit_shape(bits)[1]
    mask = (1 << bits) - 1
    n_zero_words = qzeros.shape[1]
    t0 = u0 * unit_codes
    s_buf = np.empty((1, cw), dtype=np.float32)
    z_buf = np.empty((1, cw), dtype=np.float32)
    one_group = np.empty(0, dtype=np.int64)
    for s in range(seg_group.shape[0]):
        ua, ub = max(u0, seg_start[s]), min(u1, seg_start[s + 1])
        if ua >= ub:
            continue
        g = seg_group[s]
        sc = scales[g, c0:c0 + cw]
        zrow = qzeros[g]
        for j in range(cw):
            s_buf[0, j] = f16_to_f32(sc[j])
            z_buf[0, j] = np.float32((_zero_code(zrow, c0 + j, bits, n_zero_words) + zero_add) & mask)
        dequantize_code_rows(qw, ua * unit_codes, ub * unit_codes, bits, c0, cw, s_buf, z_buf, one_group, tile,
                             ua * unit_codes - t0, lo)


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def dequantize_tile(qw, seg_start, seg_group, scales, qzeros, bits, zero_add, u0, u1, j0, j1, tile):
    """tile[t, j] = W_sorted[u0 * codes_per_unit + t, j0 + j] in float32, for units u0..u1, columns j0..j1.

    Same layout as gemv(). prange over STRIP-column strips (both cores), each strip decoded by
    _dequantize_strip.
    """
    width = j1 - j0
    for c in prange((width + STRIP - 1) // STRIP):
        lo = c * STRIP
        cw = min(width, lo + STRIP) - lo
        _dequantize_strip(qw, seg_start, seg_group, scales, qzeros, bits, zero_add, u0, u1, j0 + lo, cw,
                          tile, lo)


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def dequantize_slab(qw, seg_start, seg_group, scales, qzeros, bits, zero_add, j0, j1, tile):
    """dequantize_tile for all input rows on the calling thread only, GIL released (kernels/generic/slabs.py runs
    one per thread)."""
    n_units = seg_start[seg_start.shape[0] - 1]
    width = j1 - j0
    for lo in range(0, width, STRIP):
        cw = min(width, lo + STRIP) - lo
        _dequantize_strip(qw, seg_start, seg_group, scales, qzeros, bits, zero_add, 0, n_units, j0 + lo, cw,
                          tile, lo)
