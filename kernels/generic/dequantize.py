"""Rows of packed codes to float32: the dequantization both prefill layouts share.

Prefill multiplies float32 slabs of W with BLAS (kernels/generic/slabs.py), so a slab must be widened faster than BLAS
consumes it: at 64 activation rows BLAS spends only 128 flops per weight. Code row t of a packed matrix sits
at bit t * bits of the stream of words qw[:, j], so its word is w = (t * bits) >> 5 and its shift
s = (t * bits) & 31. A code either lies inside word w (every code for 2, 4 and 8 bits) or, for 3 bits,
straddles words w and w + 1 (codes 10 and 21 of every 3-word unit): 3-bit rows are all cut out of the 64 bits
of words w and w + 1 with one funnel shift (vpshrdd), other widths with one shift. Both run in 32-bit lanes (gptq_passes' intrinsics: Numba's own integer arithmetic widens to 64 bits and
halves the SIMD width), one row of columns at a time with the column loop innermost. The loop over rows is
inside this function, not around a per-row call: a Numba call per 64-column row costs more than the row.

The arithmetic per weight is the reference's (quant.dequantize): s * (float(q) - z) in float32, so the slabs
equal the reference bit for bit (tests/test_kernels_gptq.py).
"""

import numpy as np
from numba import njit

from .gptq_passes import funnel_f32, masked_f32, shift_right_u32


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def dequantize_code_rows(qw, t0, t1, bits, c0, cw, sc, zc, gi, tile, d0, lo):
    """tile[d0 + t - t0, lo + j] = sc[g, j] * (code[t, c0 + j] - zc[g, j]) for code rows t0 <= t < t1 of qw
    [R, out] uint32 and j < cw, where g = gi[t] (the "inplace" layout: a group per row) or g = 0 when gi is
    empty (the "segments" layout: the caller passes one group's sc, zc [1, cw])."""
    mask = (1 << bits) - 1
    per_row = gi.shape[0] > 0
    last = qw.shape[0] - 1
    # Two loop nests, chosen once: a branch per row between a funnel loop and a plain one stops LLVM from
    # vectorizing either (measured 10x slower), and the funnel form is ~15% slower where no code straddles.
    # The column loops run over uint64 views of one row each, which lets LLVM drop Numba's negative-index
    # checks and vectorize; each view costs a little per row, so callers pass strips of 256 columns.
    s_row, z_row = sc[0], zc[0]
    if bits == 3:
        for t in range(t0, t1):
            if per_row:
                s_row, z_row = sc[gi[t]], zc[gi[t]]
            dst = tile[d0 + t - t0, lo:lo + cw]
            pos = t * bits
            w = pos >> 5
            a = qw[w, c0:c0 + cw]
            b = qw[min(w + 1, last), c0:c0 + cw]     # a code that starts at bit 30 or 31 ends in word w + 1
            for j in range(np.uint64(cw)):
                dst[j] = s_row[j] * (funnel_f32(a[j], b[j], pos & 31, mask) - z_row[j])
    else:
        for t in range(t0, t1):
            if per_row:
                s_row, z_row = sc[gi[t]], zc[gi[t]]
            dst = tile[d0 + t - t0, lo:lo + cw]
            pos = t * bits
            a = qw[pos >> 5, c0:c0 + cw]
            for j in range(np.uint64(cw)):
                dst[j] = s_row[j] * (masked_f32(shift_right_u32(a[j], pos & 31), mask) - z_row[j])
