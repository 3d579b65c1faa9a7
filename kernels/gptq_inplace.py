"""Act-order layers in the checkpoint's own row order (the "inplace" layout of kernels/gptq.py).

A layer streamed from disk every token cannot afford repack_rows() (0.03-0.3 s per matrix, more than reading
it). prepare(..., repack=False) keeps qweight exactly as mapped and these kernels read it in place.

In the original row order neighbouring codes belong to unrelated groups (act-order), so the segment trick of
gemv() (one scale per run of rows) is gone. Instead each code is multiplied by its own group's scale, looked
up per input through g_idx in a small buffer sc[G, width] of the block's fp16 scales, copied contiguous once
per column block:
    y_j = sum_i x_i * s[g_i, j] * q_ij  -  sum_g (sum_{i in g} x_i) * s[g, j] * z[g, j]
The first sum is the inner loop (per code: AND, int->float, fp16->float, two multiplies, no stores: the
partial sums form a tree in registers, as in gemv()); the second needs only the per-group sums of x
(computed once per call, [N, G]) and costs G * out operations, 1/group_size of the first. The scale loads
(16 columns of scale per 16 codes) dominate the cache traffic, so sc stays fp16 (measured 1.1-1.3x faster
than a float32 copy: half the L2 -> L1 bytes for one more conversion) and a column block is narrow enough to
keep it in L2 (see inplace_block()).
_inplace_pass_source() prints each pass; tests/test_kernels_gptq_inplace.py checks they match it.
"""

import numpy as np
from numba import njit, prange

from .dequantize import dequantize_code_rows
from .gptq_gemv import _zero_code
from .gptq_passes import PASS_MATH, masked_f32, prefetch_row, unit_shape
from .half import f16_to_f32

STRIP = 256     # slab columns decoded together (dequantize_slab_inplace; kernels/dequantize.py says why)
INPLACE_PASSES = [(4, 4), (4, 1), (3, 3), (2, 1), (8, 1)]   # (bits, words per pass) written out below


def _inplace_pass_source(bits, nwords):
    """The Python source of _ipass_b{bits}_w{nwords}: like gptq_passes.pass_source, but every code also multiplies by
    the scale of its own input's group (row g_idx[i + t] of the block's fp16 scale buffer), because in the
    checkpoint's row order neighbouring codes belong to unrelated groups."""
    nvals = nwords * 32 // bits
    terms = {w: [] for w in range(nwords)}
    coefs = []
    for t in range(nvals):
        w, off = divmod(t * bits, 32)
        if off + bits <= 32:
            coefs.append((f"c{t}", t, 2.0 ** -off))
            terms[w].append((f"c{t}", t, ((1 << bits) - 1) << off))
        else:
            low = 32 - off
            coefs.append((f"c{t}a", t, 2.0 ** -off))
            terms[w].append((f"c{t}a", t, ((1 << low) - 1) << off))
            coefs.append((f"c{t}b", t, 2.0 ** low))
            terms[w + 1].append((f"c{t}b", t, (1 << (bits - low)) - 1))
    lines = ['@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)',
             f"def _ipass_b{bits}_w{nwords}(qw, r, x, i, gi, sc, acc, j0, width):",
             f'    """acc[j] += sum of x[i + t] * scale[g_idx[i + t], j] * code[t, j0 + j] over the {nvals} '
             f'{bits}-bit codes\n    in packed rows r..r+{nwords - 1}."""']
    for w in range(nwords):
        lines.append(f"    w{w} = qw[r + {w}, j0:j0 + width]" if w else "    w0 = qw[r, j0:j0 + width]")
    for t in range(nvals):
        lines.append(f"    s{t} = sc[gi[i + {t}]]")
    for c, t, scale in coefs:
        lines.append(f"    {c} = x[i + {t}]" if scale == 1.0 else f"    {c} = x[i + {t}] * np.float32({scale!r})")
    lines.append("    for j in range(np.uint64(width)):")
    for w in range(nwords):
        lines.append(f"        a{w} = w{w}[j]")
    sums = []
    for w in range(nwords):
        for half in range(2):
            parts = [f"{c} * f16_to_f32(s{t}[j]) * masked_f32(a{w}, 0x{m:08X})" for c, t, m in terms[w][half::2]]
            sums.append(f"p{w}{half}")
            lines.append("        p{}{} = ({})".format(w, half, ("\n" + " " * 17 + "+ ").join(parts)))
    while len(sums) > 1:
        pairs = [f"({a} + {b})" for a, b in zip(sums[::2], sums[1::2])]
        sums = pairs + (sums[-1:] if len(sums) % 2 else [])
    lines.append("        acc[j] += " + sums[0][1:-1] if sums[0].startswith("(") else "        acc[j] += " + sums[0])
    return "\n".join(lines) + "\n"


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _ipass_b4_w4(qw, r, x, i, gi, sc, acc, j0, width):
    """acc[j] += sum of x[i + t] * scale[g_idx[i + t], j] * code[t, j0 + j] over the 32 4-bit codes
    in packed rows r..r+3."""
    w0 = qw[r, j0:j0 + width]
    w1 = qw[r + 1, j0:j0 + width]
    w2 = qw[r + 2, j0:j0 + width]
    w3 = qw[r + 3, j0:j0 + width]
    s0 = sc[gi[i + 0]]
    s1 = sc[gi[i + 1]]
    s2 = sc[gi[i + 2]]
    s3 = sc[gi[i + 3]]
    s4 = sc[gi[i + 4]]
    s5 = sc[gi[i + 5]]
    s6 = sc[gi[i + 6]]
    s7 = sc[gi[i + 7]]
    s8 = sc[gi[i + 8]]
    s9 = sc[gi[i + 9]]
    s10 = sc[gi[i + 10]]
    s11 = sc[gi[i + 11]]
    s12 = sc[gi[i + 12]]
    s13 = sc[gi[i + 13]]
    s14 = sc[gi[i + 14]]
    s15 = sc[gi[i + 15]]
    s16 = sc[gi[i + 16]]
    s17 = sc[gi[i + 17]]
    s18 = sc[gi[i + 18]]
    s19 = sc[gi[i + 19]]
    s20 = sc[gi[i + 20]]
    s21 = sc[gi[i + 21]]
    s22 = sc[gi[i + 22]]
    s23 = sc[gi[i + 23]]
    s24 = sc[gi[i + 24]]
    s25 = sc[gi[i + 25]]
    s26 = sc[gi[i + 26]]
    s27 = sc[gi[i + 27]]
    s28 = sc[gi[i + 28]]
    s29 = sc[gi[i + 29]]
    s30 = sc[gi[i + 30]]
    s31 = sc[gi[i + 31]]
    c0 = x[i + 0]
    c1 = x[i + 1] * np.float32(0.0625)
    c2 = x[i + 2] * np.float32(0.00390625)
    c3 = x[i + 3] * np.float32(0.000244140625)
    c4 = x[i + 4] * np.float32(1.52587890625e-05)
    c5 = x[i + 5] * np.float32(9.5367431640625e-07)
    c6 = x[i + 6] * np.float32(5.960464477539063e-08)
    c7 = x[i + 7] * np.float32(3.725290298461914e-09)
    c8 = x[i + 8]
    c9 = x[i + 9] * np.float32(0.0625)
    c10 = x[i + 10] * np.float32(0.00390625)
    c11 = x[i + 11] * np.float32(0.000244140625)
    c12 = x[i + 12] * np.float32(1.52587890625e-05)
    c13 = x[i + 13] * np.float32(9.5367431640625e-07)
    c14 = x[i + 14] * np.float32(5.960464477539063e-08)
    c15 = x[i + 15] * np.float32(3.725290298461914e-09)
    c16 = x[i + 16]
    c17 = x[i + 17] * np.float32(0.0625)
    c18 = x[i + 18] * np.float32(0.00390625)
    c19 = x[i + 19] * np.float32(0.000244140625)
    c20 = x[i + 20] * np.float32(1.52587890625e-05)
    c21 = x[i + 21] * np.float32(9.5367431640625e-07)
    c22 = x[i + 22] * np.float32(5.960464477539063e-08)
    c23 = x[i + 23] * np.float32(3.725290298461914e-09)
    c24 = x[i + 24]
    c25 = x[i + 25] * np.float32(0.0625)
    c26 = x[i + 26] * np.float32(0.00390625)
    c27 = x[i + 27] * np.float32(0.000244140625)
    c28 = x[i + 28] * np.float32(1.52587890625e-05)
    c29 = x[i + 29] * np.float32(9.5367431640625e-07)
    c30 = x[i + 30] * np.float32(5.960464477539063e-08)
    c31 = x[i + 31] * np.float32(3.725290298461914e-09)
    for j in range(np.uint64(width)):
        a0 = w0[j]
        a1 = w1[j]
        a2 = w2[j]
        a3 = w3[j]
        p00 = (c0 * f16_to_f32(s0[j]) * masked_f32(a0, 0x0000000F)
                 + c2 * f16_to_f32(s2[j]) * masked_f32(a0, 0x00000F00)
                 + c4 * f16_to_f32(s4[j]) * masked_f32(a0, 0x000F0000)
                 + c6 * f16_to_f32(s6[j]) * masked_f32(a0, 0x0F000000))
        p01 = (c1 * f16_to_f32(s1[j]) * masked_f32(a0, 0x000000F0)
                 + c3 * f16_to_f32(s3[j]) * masked_f32(a0, 0x0000F000)
                 + c5 * f16_to_f32(s5[j]) * masked_f32(a0, 0x00F00000)
                 + c7 * f16_to_f32(s7[j]) * masked_f32(a0, 0xF0000000))
        p10 = (c8 * f16_to_f32(s8[j]) * masked_f32(a1, 0x0000000F)
                 + c10 * f16_to_f32(s10[j]) * masked_f32(a1, 0x00000F00)
                 + c12 * f16_to_f32(s12[j]) * masked_f32(a1, 0x000F0000)
                 + c14 * f16_to_f32(s14[j]) * masked_f32(a1, 0x0F000000))
        p11 = (c9 * f16_to_f32(s9[j]) * masked_f32(a1, 0x000000F0)
                 + c11 * f16_to_f32(s11[j]) * masked_f32(a1, 0x0000F000)
                 + c13 * f16_to_f32(s13[j]) * masked_f32(a1, 0x00F00000)
                 + c15 * f16_to_f32(s15[j]) * masked_f32(a1, 0xF0000000))
        p20 = (c16 * f16_to_f32(s16[j]) * masked_f32(a2, 0x0000000F)
                 + c18 * f16_to_f32(s18[j]) * masked_f32(a2, 0x00000F00)
                 + c20 * f16_to_f32(s20[j]) * masked_f32(a2, 0x000F0000)
                 + c22 * f16_to_f32(s22[j]) * masked_f32(a2, 0x0F000000))
        p21 = (c17 * f16_to_f32(s17[j]) * masked_f32(a2, 0x000000F0)
                 + c19 * f16_to_f32(s19[j]) * masked_f32(a2, 0x0000F000)
                 + c21 * f16_to_f32(s21[j]) * masked_f32(a2, 0x00F00000)
                 + c23 * f16_to_f32(s23[j]) * masked_f32(a2, 0xF0000000))
        p30 = (c24 * f16_to_f32(s24[j]) * masked_f32(a3, 0x0000000F)
                 + c26 * f16_to_f32(s26[j]) * masked_f32(a3, 0x00000F00)
                 + c28 * f16_to_f32(s28[j]) * masked_f32(a3, 0x000F0000)
                 + c30 * f16_to_f32(s30[j]) * masked_f32(a3, 0x0F000000))
        p31 = (c25 * f16_to_f32(s25[j]) * masked_f32(a3, 0x000000F0)
                 + c27 * f16_to_f32(s27[j]) * masked_f32(a3, 0x0000F000)
                 + c29 * f16_to_f32(s29[j]) * masked_f32(a3, 0x00F00000)
                 + c31 * f16_to_f32(s31[j]) * masked_f32(a3, 0xF0000000))
        acc[j] += ((p00 + p01) + (p10 + p11)) + ((p20 + p21) + (p30 + p31))


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _ipass_b4_w1(qw, r, x, i, gi, sc, acc, j0, width):
    """acc[j] += sum of x[i + t] * scale[g_idx[i + t], j] * code[t, j0 + j] over the 8 4-bit codes
    in packed rows r..r+0."""
    w0 = qw[r, j0:j0 + width]
    s0 = sc[gi[i + 0]]
    s1 = sc[gi[i + 1]]
    s2 = sc[gi[i + 2]]
    s3 = sc[gi[i + 3]]
    s4 = sc[gi[i + 4]]
    s5 = sc[gi[i + 5]]
    s6 = sc[gi[i + 6]]
    s7 = sc[gi[i + 7]]
    c0 = x[i + 0]
    c1 = x[i + 1] * np.float32(0.0625)
    c2 = x[i + 2] * np.float32(0.00390625)
    c3 = x[i + 3] * np.float32(0.000244140625)
    c4 = x[i + 4] * np.float32(1.52587890625e-05)
    c5 = x[i + 5] * np.float32(9.5367431640625e-07)
    c6 = x[i + 6] * np.float32(5.960464477539063e-08)
    c7 = x[i + 7] * np.float32(3.725290298461914e-09)
    for j in range(np.uint64(width)):
        a0 = w0[j]
        p00 = (c0 * f16_to_f32(s0[j]) * masked_f32(a0, 0x0000000F)
                 + c2 * f16_to_f32(s2[j]) * masked_f32(a0, 0x00000F00)
                 + c4 * f16_to_f32(s4[j]) * masked_f32(a0, 0x000F0000)
                 + c6 * f16_to_f32(s6[j]) * masked_f32(a0, 0x0F000000))
        p01 = (c1 * f16_to_f32(s1[j]) * masked_f32(a0, 0x000000F0)
                 + c3 * f16_to_f32(s3[j]) * masked_f32(a0, 0x0000F000)
                 + c5 * f16_to_f32(s5[j]) * masked_f32(a0, 0x00F00000)
                 + c7 * f16_to_f32(s7[j]) * masked_f32(a0, 0xF0000000))
        acc[j] += p00 + p01


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _ipass_b3_w3(qw, r, x, i, gi, sc, acc, j0, width):
    """acc[j] += sum of x[i + t] * scale[g_idx[i + t], j] * code[t, j0 + j] over the 32 3-bit codes
    in packed rows r..r+2."""
    w0 = qw[r, j0:j0 + width]
    w1 = qw[r + 1, j0:j0 + width]
    w2 = qw[r + 2, j0:j0 + width]
    s0 = sc[gi[i + 0]]
    s1 = sc[gi[i + 1]]
    s2 = sc[gi[i + 2]]
    s3 = sc[gi[i + 3]]
    s4 = sc[gi[i + 4]]
    s5 = sc[gi[i + 5]]
    s6 = sc[gi[i + 6]]
    s7 = sc[gi[i + 7]]
    s8 = sc[gi[i + 8]]
    s9 = sc[gi[i + 9]]
    s10 = sc[gi[i + 10]]
    s11 = sc[gi[i + 11]]
    s12 = sc[gi[i + 12]]
    s13 = sc[gi[i + 13]]
    s14 = sc[gi[i + 14]]
    s15 = sc[gi[i + 15]]
    s16 = sc[gi[i + 16]]
    s17 = sc[gi[i + 17]]
    s18 = sc[gi[i + 18]]
    s19 = sc[gi[i + 19]]
    s20 = sc[gi[i + 20]]
    s21 = sc[gi[i + 21]]
    s22 = sc[gi[i + 22]]
    s23 = sc[gi[i + 23]]
    s24 = sc[gi[i + 24]]
    s25 = sc[gi[i + 25]]
    s26 = sc[gi[i + 26]]
    s27 = sc[gi[i + 27]]
    s28 = sc[gi[i + 28]]
    s29 = sc[gi[i + 29]]
    s30 = sc[gi[i + 30]]
    s31 = sc[gi[i + 31]]
    c0 = x[i + 0]
    c1 = x[i + 1] * np.float32(0.125)
    c2 = x[i + 2] * np.float32(0.015625)
    c3 = x[i + 3] * np.float32(0.001953125)
    c4 = x[i + 4] * np.float32(0.000244140625)
    c5 = x[i + 5] * np.float32(3.0517578125e-05)
    c6 = x[i + 6] * np.float32(3.814697265625e-06)
    c7 = x[i + 7] * np.float32(4.76837158203125e-07)
    c8 = x[i + 8] * np.float32(5.960464477539063e-08)
    c9 = x[i + 9] * np.float32(7.450580596923828e-09)
    c10a = x[i + 10] * np.float32(9.313225746154785e-10)
    c10b = x[i + 10] * np.float32(4.0)
    c11 = x[i + 11] * np.float32(0.5)
    c12 = x[i + 12] * np.float32(0.0625)
    c13 = x[i + 13] * np.float32(0.0078125)
    c14 = x[i + 14] * np.float32(0.0009765625)
    c15 = x[i + 15] * np.float32(0.0001220703125)
    c16 = x[i + 16] * np.float32(1.52587890625e-05)
    c17 = x[i + 17] * np.float32(1.9073486328125e-06)
    c18 = x[i + 18] * np.float32(2.384185791015625e-07)
    c19 = x[i + 19] * np.float32(2.9802322387695312e-08)
    c20 = x[i + 20] * np.float32(3.725290298461914e-09)
    c21a = x[i + 21] * np.float32(4.656612873077393e-10)
    c21b = x[i + 21] * np.float32(2.0)
    c22 = x[i + 22] * np.float32(0.25)
    c23 = x[i + 23] * np.float32(0.03125)
    c24 = x[i + 24] * np.float32(0.00390625)
    c25 = x[i + 25] * np.float32(0.00048828125)
    c26 = x[i + 26] * np.float32(6.103515625e-05)
    c27 = x[i + 27] * np.float32(7.62939453125e-06)
    c28 = x[i + 28] * np.float32(9.5367431640625e-07)
    c29 = x[i + 29] * np.float32(1.1920928955078125e-07)
    c30 = x[i + 30] * np.float32(1.4901161193847656e-08)
    c31 = x[i + 31] * np.float32(1.862645149230957e-09)
    for j in range(np.uint64(width)):
        a0 = w0[j]
        a1 = w1[j]
        a2 = w2[j]
        p00 = (c0 * f16_to_f32(s0[j]) * masked_f32(a0, 0x00000007)
                 + c2 * f16_to_f32(s2[j]) * masked_f32(a0, 0x000001C0)
                 + c4 * f16_to_f32(s4[j]) * masked_f32(a0, 0x00007000)
                 + c6 * f16_to_f32(s6[j]) * masked_f32(a0, 0x001C0000)
                 + c8 * f16_to_f32(s8[j]) * masked_f32(a0, 0x07000000)
                 + c10a * f16_to_f32(s10[j]) * masked_f32(a0, 0xC0000000))
        p01 = (c1 * f16_to_f32(s1[j]) * masked_f32(a0, 0x00000038)
                 + c3 * f16_to_f32(s3[j]) * masked_f32(a0, 0x00000E00)
                 + c5 * f16_to_f32(s5[j]) * masked_f32(a0, 0x00038000)
                 + c7 * f16_to_f32(s7[j]) * masked_f32(a0, 0x00E00000)
                 + c9 * f16_to_f32(s9[j]) * masked_f32(a0, 0x38000000))
        p10 = (c10b * f16_to_f32(s10[j]) * masked_f32(a1, 0x00000001)
                 + c12 * f16_to_f32(s12[j]) * masked_f32(a1, 0x00000070)
                 + c14 * f16_to_f32(s14[j]) * masked_f32(a1, 0x00001C00)
                 + c16 * f16_to_f32(s16[j]) * masked_f32(a1, 0x00070000)
                 + c18 * f16_to_f32(s18[j]) * masked_f32(a1, 0x01C00000)
                 + c20 * f16_to_f32(s20[j]) * masked_f32(a1, 0x70000000))
        p11 = (c11 * f16_to_f32(s11[j]) * masked_f32(a1, 0x0000000E)
                 + c13 * f16_to_f32(s13[j]) * masked_f32(a1, 0x00000380)
                 + c15 * f16_to_f32(s15[j]) * masked_f32(a1, 0x0000E000)
                 + c17 * f16_to_f32(s17[j]) * masked_f32(a1, 0x00380000)
                 + c19 * f16_to_f32(s19[j]) * masked_f32(a1, 0x0E000000)
                 + c21a * f16_to_f32(s21[j]) * masked_f32(a1, 0x80000000))
        p20 = (c21b * f16_to_f32(s21[j]) * masked_f32(a2, 0x00000003)
                 + c23 * f16_to_f32(s23[j]) * masked_f32(a2, 0x000000E0)
                 + c25 * f16_to_f32(s25[j]) * masked_f32(a2, 0x00003800)
                 + c27 * f16_to_f32(s27[j]) * masked_f32(a2, 0x000E0000)
                 + c29 * f16_to_f32(s29[j]) * masked_f32(a2, 0x03800000)
                 + c31 * f16_to_f32(s31[j]) * masked_f32(a2, 0xE0000000))
        p21 = (c22 * f16_to_f32(s22[j]) * masked_f32(a2, 0x0000001C)
                 + c24 * f16_to_f32(s24[j]) * masked_f32(a2, 0x00000700)
                 + c26 * f16_to_f32(s26[j]) * masked_f32(a2, 0x0001C000)
                 + c28 * f16_to_f32(s28[j]) * masked_f32(a2, 0x00700000)
                 + c30 * f16_to_f32(s30[j]) * masked_f32(a2, 0x1C000000))
        acc[j] += ((p00 + p01) + (p10 + p11)) + (p20 + p21)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _ipass_b2_w1(qw, r, x, i, gi, sc, acc, j0, width):
    """acc[j] += sum of x[i + t] * scale[g_idx[i + t], j] * code[t, j0 + j] over the 16 2-bit codes
    in packed rows r..r+0."""
    w0 = qw[r, j0:j0 + width]
    s0 = sc[gi[i + 0]]
    s1 = sc[gi[i + 1]]
    s2 = sc[gi[i + 2]]
    s3 = sc[gi[i + 3]]
    s4 = sc[gi[i + 4]]
    s5 = sc[gi[i + 5]]
    s6 = sc[gi[i + 6]]
    s7 = sc[gi[i + 7]]
    s8 = sc[gi[i + 8]]
    s9 = sc[gi[i + 9]]
    s10 = sc[gi[i + 10]]
    s11 = sc[gi[i + 11]]
    s12 = sc[gi[i + 12]]
    s13 = sc[gi[i + 13]]
    s14 = sc[gi[i + 14]]
    s15 = sc[gi[i + 15]]
    c0 = x[i + 0]
    c1 = x[i + 1] * np.float32(0.25)
    c2 = x[i + 2] * np.float32(0.0625)
    c3 = x[i + 3] * np.float32(0.015625)
    c4 = x[i + 4] * np.float32(0.00390625)
    c5 = x[i + 5] * np.float32(0.0009765625)
    c6 = x[i + 6] * np.float32(0.000244140625)
    c7 = x[i + 7] * np.float32(6.103515625e-05)
    c8 = x[i + 8] * np.float32(1.52587890625e-05)
    c9 = x[i + 9] * np.float32(3.814697265625e-06)
    c10 = x[i + 10] * np.float32(9.5367431640625e-07)
    c11 = x[i + 11] * np.float32(2.384185791015625e-07)
    c12 = x[i + 12] * np.float32(5.960464477539063e-08)
    c13 = x[i + 13] * np.float32(1.4901161193847656e-08)
    c14 = x[i + 14] * np.float32(3.725290298461914e-09)
    c15 = x[i + 15] * np.float32(9.313225746154785e-10)
    for j in range(np.uint64(width)):
        a0 = w0[j]
        p00 = (c0 * f16_to_f32(s0[j]) * masked_f32(a0, 0x00000003)
                 + c2 * f16_to_f32(s2[j]) * masked_f32(a0, 0x00000030)
                 + c4 * f16_to_f32(s4[j]) * masked_f32(a0, 0x00000300)
                 + c6 * f16_to_f32(s6[j]) * masked_f32(a0, 0x00003000)
                 + c8 * f16_to_f32(s8[j]) * masked_f32(a0, 0x00030000)
                 + c10 * f16_to_f32(s10[j]) * masked_f32(a0, 0x00300000)
                 + c12 * f16_to_f32(s12[j]) * masked_f32(a0, 0x03000000)
                 + c14 * f16_to_f32(s14[j]) * masked_f32(a0, 0x30000000))
        p01 = (c1 * f16_to_f32(s1[j]) * masked_f32(a0, 0x0000000C)
                 + c3 * f16_to_f32(s3[j]) * masked_f32(a0, 0x000000C0)
                 + c5 * f16_to_f32(s5[j]) * masked_f32(a0, 0x00000C00)
                 + c7 * f16_to_f32(s7[j]) * masked_f32(a0, 0x0000C000)
                 + c9 * f16_to_f32(s9[j]) * masked_f32(a0, 0x000C0000)
                 + c11 * f16_to_f32(s11[j]) * masked_f32(a0, 0x00C00000)
                 + c13 * f16_to_f32(s13[j]) * masked_f32(a0, 0x0C000000)
                 + c15 * f16_to_f32(s15[j]) * masked_f32(a0, 0xC0000000))
        acc[j] += p00 + p01


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _ipass_b8_w1(qw, r, x, i, gi, sc, acc, j0, width):
    """acc[j] += sum of x[i + t] * scale[g_idx[i + t], j] * code[t, j0 + j] over the 4 8-bit codes
    in packed rows r..r+0."""
    w0 = qw[r, j0:j0 + width]
    s0 = sc[gi[i + 0]]
    s1 = sc[gi[i + 1]]
    s2 = sc[gi[i + 2]]
    s3 = sc[gi[i + 3]]
    c0 = x[i + 0]
    c1 = x[i + 1] * np.float32(0.00390625)
    c2 = x[i + 2] * np.float32(1.52587890625e-05)
    c3 = x[i + 3] * np.float32(5.960464477539063e-08)
    for j in range(np.uint64(width)):
        a0 = w0[j]
        p00 = (c0 * f16_to_f32(s0[j]) * masked_f32(a0, 0x000000FF)
                 + c2 * f16_to_f32(s2[j]) * masked_f32(a0, 0x00FF0000))
        p01 = (c1 * f16_to_f32(s1[j]) * masked_f32(a0, 0x0000FF00)
                 + c3 * f16_to_f32(s3[j]) * masked_f32(a0, 0xFF000000))
        acc[j] += p00 + p01


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def _prefetch_rows(qw, r0, r1, j0, width):
    """Ask for packed rows r0..r1 (columns j0..j0 + width) one pass before they are read. The rows of a pass
    are `out` words apart, so each is its own short stream that the hardware prefetchers pick up late; asking
    one pass ahead (a few microseconds of work) costs about 4% more instructions. Measured on the shared
    2-core machine: up to 1.3x faster for the 3-bit decode with float32 scales; with fp16 scales the effect
    is within the run-to-run noise (0.8-1.3x) for 3 bits and neutral for 4 bits."""
    for r in range(r0, min(r1, qw.shape[0])):
        for k in range(0, width, 16):
            prefetch_row(qw, r, j0 + k)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _ipass_tail(qw, t0, t1, bits, x, gi, sc, acc, j0, width):
    """acc[j] += x[t] * scale[g_idx[t], j] * code[t, j0 + j] for codes t0..t1, one code at a time (the inputs
    past the last whole unit of packed words: 3-bit layers whose inputs are not a multiple of 32)."""
    mask = (1 << bits) - 1
    last = qw.shape[0] - 1
    for t in range(t0, t1):
        pos = t * bits
        w = pos >> 5
        shift = pos & 31
        row0 = qw[w, j0:j0 + width]
        row1 = qw[min(w + 1, last), j0:j0 + width]
        s = sc[gi[t]]
        xt = x[t]
        for j in range(np.uint64(width)):
            q = ((np.int64(row0[j]) | (np.int64(row1[j]) << 32)) >> shift) & mask
            acc[j] += xt * f16_to_f32(s[j]) * np.float32(q)


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def _widen_zero_rows(qzeros, bits, zero_add, j0, width, zc):
    """zc[g, j] = true zero of group g, column j0 + j, as float32."""
    n_zero_words = qzeros.shape[1]
    mask = (1 << bits) - 1
    for g in range(zc.shape[0]):
        zrow = qzeros[g]
        zdst = zc[g]
        for j in range(width):
            zdst[j] = np.float32((_zero_code(zrow, j0 + j, bits, n_zero_words) + zero_add) & mask)


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def _widen_group_rows(scales, qzeros, bits, zero_add, j0, width, sc, zc):
    """sc[g, j] = scale of group g, column j0 + j as float32; zc[g, j] its true zero."""
    for g in range(sc.shape[0]):
        srow = scales[g, j0:j0 + width]
        dst = sc[g]
        for j in range(np.uint64(width)):
            dst[j] = f16_to_f32(srow[j])
    _widen_zero_rows(qzeros, bits, zero_add, j0, width, zc)


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def gemv_inplace(qw, xg, gi, sumx, scales, qzeros, bits, zero_add, const_zero, n_in, block, chunk_bytes,
                 y):
    """y[n, :] = x[n, :] @ W for a few rows n, with qw the checkpoint's qweight in its ORIGINAL row order.

    qw [R, out] uint32 as mapped (no copy), xg [N, units * codes_per_unit] float32 (x zero padded to whole
    units), gi [units * codes_per_unit] int64 (g_idx, padded with group 0: padded inputs have x = 0),
    sumx [N, G] float32 per-group sums of x, scales [G, out] uint16 fp16 bits, qzeros [G, words] uint32,
    zero_add / const_zero as in gemv(). Loop order: prange over column blocks of `block` columns; per block,
    copy the block's fp16 scales of every group once into sc [G, block] (and widen the zeros into zc unless
    const_zero >= 0); then, per chunk of packed rows (about chunk_bytes of this block's columns) and per
    activation row, run the passes with the column loop innermost (vectorized): acc[n, j] += x_i s_gi,j q_ij.
    The chunk is read from memory by the first activation row (prefetched one pass ahead) and from L2 by the
    others. Finally
    y = acc - sum_g sumx_g s_g z_g (zero term once per group and column, not per code).
    """
    n_rows = xg.shape[0]
    n_out = qw.shape[1]
    n_groups = scales.shape[0]
    unit_words, unit_codes = unit_shape(bits)
    n_full = min(qw.shape[0] // unit_words, n_in // unit_codes)   # units whose words and inputs all exist
    n_blocks = (n_out + block - 1) // block
    for b in prange(n_blocks):
        j0 = b * block
        width = min(n_out, j0 + block) - j0
        sc = np.empty((n_groups, width), dtype=np.uint16)
        for g in range(n_groups):
            sc[g] = scales[g, j0:j0 + width]
        zc = np.empty((n_groups if const_zero < 0 else 1, width), dtype=np.float32)
        if const_zero < 0:
            _widen_zero_rows(qzeros, bits, zero_add, j0, width, zc)
        accs = np.zeros((n_rows, width), dtype=np.float32)
        # Packed rows in chunks of about INPLACE_CHUNK_BYTES (a whole number of passes): every activation row
        # runs over one chunk before the next is read, so the chunk is read from memory once, from L2 after.
        chunk = max(4, (chunk_bytes // (width * 4 * unit_words)) // 4 * 4)      # units per chunk
        for c0 in range(0, n_full, chunk):
            c1 = min(n_full, c0 + chunk)
            for n in range(n_rows):
                x = xg[n]
                acc = accs[n]
                u = c0
                if bits == 4:
                    while u + 4 <= c1:
                        if n == 0:
                            _prefetch_rows(qw, u + 4, u + 8, j0, width)
                        _ipass_b4_w4(qw, u, x, u * 8, gi, sc, acc, j0, width)
                        u += 4
                    while u < c1:
                        _ipass_b4_w1(qw, u, x, u * 8, gi, sc, acc, j0, width)
                        u += 1
                elif bits == 3:
                    while u < c1:
                        if n == 0:
                            _prefetch_rows(qw, (u + 1) * 3, (u + 2) * 3, j0, width)
                        _ipass_b3_w3(qw, u * 3, x, u * 32, gi, sc, acc, j0, width)
                        u += 1
                elif bits == 8:
                    while u < c1:
                        _ipass_b8_w1(qw, u, x, u * 4, gi, sc, acc, j0, width)
                        u += 1
                else:
                    while u < c1:
                        _ipass_b2_w1(qw, u, x, u * 16, gi, sc, acc, j0, width)
                        u += 1
        for n in range(n_rows):
            x = xg[n]
            acc = accs[n]
            _ipass_tail(qw, n_full * unit_codes, n_in, bits, x, gi, sc, acc, j0, width)
            out = y[n, j0:j0 + width]
            for j in range(np.uint64(width)):
                out[j] = acc[j]
            for g in range(n_groups):
                sx = sumx[n, g]
                srow = sc[g]
                if const_zero >= 0:
                    sz = sx * np.float32(const_zero)
                    for j in range(np.uint64(width)):
                        out[j] -= sz * f16_to_f32(srow[j])
                else:
                    zrow = zc[g]
                    for j in range(np.uint64(width)):
                        out[j] -= sx * f16_to_f32(srow[j]) * zrow[j]


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def dequantize_slab_inplace(qw, gi, scales, qzeros, bits, zero_add, n_in, j0, j1, tile):
    """tile[i, j] = W[i, j0 + j] for every input i in the ORIGINAL row order (qw as in gemv_inplace), on the
    calling thread only, GIL released (kernels/slabs.py runs one per thread).

    Per STRIP-column strip the scales and zeros of every group are widened once into sc / zc [G, STRIP]; then each
    code row is decoded by kernels/dequantize.py with the column loop innermost, looking up its group's rows
    through g_idx.
    """
    n_groups = scales.shape[0]
    width = j1 - j0
    sc = np.empty((n_groups, STRIP), dtype=np.float32)
    zc = np.empty((n_groups, STRIP), dtype=np.float32)
    for lo in range(0, width, STRIP):
        cw = min(width, lo + STRIP) - lo
        c0 = j0 + lo
        _widen_group_rows(scales, qzeros, bits, zero_add, c0, cw, sc[:, :cw], zc[:, :cw])
        dequantize_code_rows(qw, 0, n_in, bits, c0, cw, sc, zc, gi, tile, 0, lo)
