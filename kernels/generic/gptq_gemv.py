"""Decode: the fused dequantize-GEMV for a few activation rows, on the "segments" layout of kernels/gptq.py.

For one segment of packed rows that all belong to group g (the group-sum factorisation):
    sum_i x_i * s_gj * (q_ij - z_gj) = s_gj * (sum_i x_i * q_ij  -  z_gj * sum_i x_i)
so the passes (kernels/generic/gptq_passes.py) only accumulate acc_j += x_i * q_ij, and scale and zero are applied
once per segment and column by the folds below.
"""

import numpy as np
from numba import njit, prange

from .gptq_passes import (_pass_b2_w1, _pass_b2_w2, _pass_b3_w3, _pass_b4_w1, _pass_b4_w4, _pass_b8_w1,
                          _pass_b8_w4, unit_shape)
from .half import f16_to_f32


@njit(inline="always")
def _zero_code(zrow, col, bits, n_words):
    """Stored zero code of column col from one qzeros row (a bit stream): read the 64 bits starting at the
    word that holds the code's first bit, so a code straddling two words (3 bits) needs no branch."""
    pos = col * bits
    w = pos >> 5
    w1 = min(w + 1, n_words - 1)     # the last word never straddles, so reading it twice is harmless
    both = np.int64(zrow[w]) | (np.int64(zrow[w1]) << 32)
    return (both >> (pos & 31)) & ((1 << bits) - 1)


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def _unpack_zero_row(zrow, j0, width, bits, zero_add, z_out):
    """z_out[j] = true zero of column j0 + j as float32, from one qzeros row (a bit stream of `bits`-bit
    codes). Unsigned loop indices let LLVM drop Numba's negative-index checks and vectorize (gathers)."""
    ub = np.uint64(bits)
    mask = np.uint64((1 << bits) - 1)
    add = np.uint64(zero_add)
    last = np.uint64(zrow.shape[0] - 1)
    base = np.uint64(j0) * ub
    for j in range(np.uint64(width)):
        pos = base + j * ub
        w = pos >> np.uint64(5)
        both = np.uint64(zrow[w]) | (np.uint64(zrow[min(w + np.uint64(1), last)]) << np.uint64(32))
        z_out[j] = np.float32(((both >> (pos & np.uint64(31))) + add) & mask)


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def fold_rows(y, acc, s, g, j0, width, scales, qzeros, bits, zero_add, const_zero, sumx, zbuf):
    """Every row's fold of one segment (group g) into y[:, j0:j0 + width]: y += s_g (acc - z_g sum x), the
    step the integer decode kernels (split8, int8; VNNI and AVX2) share after their dot products."""
    if const_zero < 0:
        _unpack_zero_row(qzeros[g], j0, width, bits, zero_add, zbuf)
    for n in range(acc.shape[0]):
        out = y[n, j0:j0 + width]
        if const_zero >= 0:
            _fold_segment_const_zero(out, acc[n], scales[g, j0:j0 + width], np.float32(const_zero), sumx[n, s])
        else:
            _fold_segment(out, acc[n], scales[g, j0:j0 + width], zbuf, sumx[n, s])


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def _fold_segment(out, acc, scales_row, zeros_row, sum_x):
    """out[j] += s_j * (acc[j] - z_j * sum_x): scale and zero applied once per segment and column; acc is
    cleared in the same pass for the next segment."""
    for j in range(np.uint64(out.shape[0])):
        out[j] += f16_to_f32(scales_row[j]) * (acc[j] - zeros_row[j] * sum_x)
        acc[j] = 0.0


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def _fold_segment_const_zero(out, acc, scales_row, zero, sum_x):
    """_fold_segment when every zero of the layer is the same (symmetric quantization, checked at load)."""
    z_sum = zero * sum_x
    for j in range(np.uint64(out.shape[0])):
        out[j] += f16_to_f32(scales_row[j]) * (acc[j] - z_sum)
        acc[j] = 0.0


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def _segment_passes(qw, u0, u1, bits, xp, accs, j0, width):
    """accs[n, j] += sum of xp[n, t] * code[t, j0 + j] over the codes t of units u0..u1, for every row n.

    Rows are the inner loop: a pass's packed rows (a few x width words, tens of KB) come from memory for row
    0, which also prefetches the next pass, and from L1/L2 for the others, so a batch of N rows reads the
    weights once, not N times."""
    n_rows = xp.shape[0]
    u = u0
    if bits == 4:
        while u + 4 <= u1:
            for n in range(n_rows):
                _pass_b4_w4(qw, u, xp[n], u * 8, accs[n], j0, width, 4 if n == 0 else 0)
            u += 4
        while u < u1:
            for n in range(n_rows):
                _pass_b4_w1(qw, u, xp[n], u * 8, accs[n], j0, width, 1 if n == 0 else 0)
            u += 1
    elif bits == 3:
        while u < u1:
            for n in range(n_rows):
                _pass_b3_w3(qw, u * 3, xp[n], u * 32, accs[n], j0, width, 3 if n == 0 else 0)
            u += 1
    elif bits == 8:
        while u + 4 <= u1:
            for n in range(n_rows):
                _pass_b8_w4(qw, u, xp[n], u * 4, accs[n], j0, width, 4 if n == 0 else 0)
            u += 4
        while u < u1:
            for n in range(n_rows):
                _pass_b8_w1(qw, u, xp[n], u * 4, accs[n], j0, width, 1 if n == 0 else 0)
            u += 1
    else:
        while u + 2 <= u1:
            for n in range(n_rows):
                _pass_b2_w2(qw, u, xp[n], u * 16, accs[n], j0, width, 2 if n == 0 else 0)
            u += 2
        while u < u1:
            for n in range(n_rows):
                _pass_b2_w1(qw, u, xp[n], u * 16, accs[n], j0, width, 1 if n == 0 else 0)
            u += 1


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def gemv(qw, xp, seg_start, seg_group, scales, qzeros, bits, zero_add, const_zero, block, y):
    """y[n, :] = xp[n, :] @ W_sorted for a few rows n, reading the packed weights once for all rows.

    qw [R, out] uint32 (packed rows in segment order), xp [N, units * codes_per_unit] float32 (x permuted to
    that order, zero padded), segments seg_start [S + 1] (in units) / seg_group [S], scales [G, out] as
    uint16 fp16 bits, qzeros [G, words] uint32, zero_add 1 for checkpoint_format "gptq" (AutoGPTQ stores
    zero - 1) else 0; const_zero >= 0 is the true zero of every column and group when prepare() found them
    all equal (symmetric quantization), and then qzeros is not unpacked per segment.

    Loop order: prange over column blocks, one long block per thread (gemv_block in kernels/gptq.py: each
    thread streams its own columns of every packed row, the longer the runs the better the hardware
    prefetchers follow); per block, per segment: accumulate acc[n, j] = sum x_ni q_ij over the segment's
    packed rows (_segment_passes), then fold in scale and zero once: y[n] += s (acc[n] - z sum x_n).
    """
    n_rows = xp.shape[0]
    n_out = qw.shape[1]
    unit_codes = unit_shape(bits)[1]
    n_blocks = (n_out + block - 1) // block
    for b in prange(n_blocks):
        j0 = b * block
        width = min(n_out, j0 + block) - j0
        accs = np.zeros((n_rows, width), dtype=np.float32)                  # [N, width]
        zbuf = np.empty(width, dtype=np.float32)
        for n in range(n_rows):
            y[n, j0:j0 + width] = 0.0
        for s in range(seg_group.shape[0]):
            u0, u1 = seg_start[s], seg_start[s + 1]
            _segment_passes(qw, u0, u1, bits, xp, accs, j0, width)
            g = seg_group[s]
            if const_zero < 0:
                _unpack_zero_row(qzeros[g], j0, width, bits, zero_add, zbuf)
            for n in range(n_rows):
                xs = xp[n, u0 * unit_codes:u1 * unit_codes]
                sum_x = np.float32(0.0)
                for i in range(np.uint64(xs.shape[0])):
                    sum_x += xs[i]
                if const_zero >= 0:
                    _fold_segment_const_zero(y[n, j0:j0 + width], accs[n], scales[g, j0:j0 + width],
                                             np.float32(const_zero), sum_x)
                else:
                    _fold_segment(y[n, j0:j0 + width], accs[n], scales[g, j0:j0 + width], zbuf, sum_x)
