"""Act-order layers in the checkpoint's own row order (the "inplace" layout of kernels/gptq.py).

A layer streamed from disk every token cannot afford repack_rows() (0.03-0.3 s per matrix, more than reading
it). prepare(..., repack=False) keeps qweight exactly as mapped and these kernels read it in place.

In the original row order neighbouring codes belong to unrelated groups (act-order), so the segment trick of
gemv() (one scale per run of rows) is gone. Instead each code is multiplied by its own group's scale, looked
up per input through g_idx in a small buffer sc[G, width] of the block's fp16 scales, copied contiguous once
per column block:
    y_nj = sum_i x_ni * (s[g_i, j] * q_ij)  -  sum_g (sum_{i in g} x_ni) * s[g, j] * z[g, j]
The first sum is the inner loop; the second needs only the per-group sums of x (computed once per call,
[N, G]) and costs G * out operations, 1/group_size of the first.

The inner loop (gemv_inplace, one unit of packed words at a time, _unit_rows):
  - per 16 columns and code t, d_t = s[g_t, j] * q_tj is made ONCE for all activation rows: fp16 -> float32,
    shift, AND, int -> float, multiply. It is exact (an fp16 scale has 11 significant bits, a code at most 8),
    so every row's product x * d is rounded once.
  - then every activation row takes its eight products (d_t in registers, x broadcast from memory) as two
    chains of fused multiply-adds, even and odd codes, added to the row's accumulator. A batch of N rows
    costs one decode of the codes plus N times the multiply-adds: 8 rows take about 2.5x one row, where
    decoding the codes again for every row took 4x (8192 x 28672, 4-bit g128, 2 threads: 36-45 -> 14-16 ms).
  - the accumulators are flushed into a second sum every FLUSH_CODES inputs, so each output is about
    n_in / 128 + 128 / 8 float32 additions deep rather than n_in / 8 (measured: half the old kernels'
    largest error against float64 on a 8192 x 2048 layer).
  - each row's arithmetic is the same whatever the other rows are, so a sequence decodes the same numbers
    alone and in a batch (test_kernels_gptq_inplace.py checks it).
  - Numba has no vector types and cannot tell the rows' accumulators apart (no aliasing information: its own
    loop over rows inside the column loop stayed scalar, 5x slower), so the unit is written in LLVM IR.
    The kernel is compiled without fastmath's "reassoc" (PASS_MATH): with it LLVM rewrote the chains into
    one long one, 4x less accurate.
Columns past the last multiple of 16 and inputs past the last whole unit (3-bit layers whose inputs are not
a multiple of 32) take scalar loops with the same arithmetic.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .dequantize import dequantize_code_rows
from .gptq_gemv import _zero_code
from .gptq_passes import PASS_MATH, unit_shape
from .half import f16_to_f32
from .. import llvm

STRIP = 256          # slab columns decoded together (dequantize_slab_inplace; kernels/generic/dequantize.py says why)
LANES = 16           # columns per AVX-512 vector of float32
CHAIN = 8            # codes whose products a row adds in two chains (even, odd) before its accumulator
FLUSH_CODES = 128    # inputs summed into the per-block partial sums before they are added to the total
AHEAD_UNITS = 2      # units of packed words ahead that the unit prefetches (each packed row is its own stream)


def _code_places(bits):
    """For each code t of one unit: (word, bit offset, straddles into the next word)."""
    unit_codes = unit_shape(bits)[1]
    places = []
    for t in range(unit_codes):
        word, off = divmod(t * bits, 32)
        places.append((word, off, off + bits > 32))
    return places


def _unit_rows(bits):
    """An LLVM intrinsic for one unit of `bits`-bit codes (module docstring):
        part[n, v*16 : v*16 + 16] += products of the unit's codes with row n of x, for v < n_vec, n < n_rows
    Arguments (all byte addresses or byte strides, int64): part, part_row; n_rows; w (the unit's first packed
    word of column 0), w_row (bytes between packed rows); sc (the block's fp16 scales, group 0, column 0),
    sc_row; gi (g_idx of the unit's first input); x (row 0, the unit's first input), x_row; n_vec; ahead
    (bytes from a packed word to the one to prefetch)."""
    unit_words, unit_codes = unit_shape(bits)
    places = _code_places(bits)
    chain = min(CHAIN, unit_codes)

    @intrinsic
    def unit_rows(typingctx, part, part_row, n_rows, w, w_row, sc, sc_row, gi, x, x_row, n_vec, ahead):
        def codegen(context, builder, signature, args):
            part_a, part_stride, nr, w_a, w_stride, sc_a, sc_stride, gi_a, x_a, x_stride, nv, ahead_b = args
            i16, i32, i64, f32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
            v16i, v16f = ir.VectorType(i32, LANES), ir.VectorType(f32, LANES)
            v16s = ir.VectorType(i16, LANES)
            module = builder.module
            fma = llvm.declare(module, "llvm.fma.v16f32", v16f, [v16f] * 3)
            fshr = llvm.declare(module, "llvm.fshr.v16i32", v16i, [v16i] * 3)

            def load(addr, ty, align):
                return llvm.load(builder, addr, ty, align)

            def splat(value):
                return llvm.splat(builder, value, v16f)

            def vconst(value):
                return ir.Constant(v16i, [value] * LANES)

            # The scale row of every code's group, once for all columns: sc + g_idx[t] * sc_row.
            rows = [builder.add(sc_a, builder.mul(load(builder.add(gi_a, i64(8 * t)), i64, 8), sc_stride))
                    for t in range(unit_codes)]
            with cgutils.for_range(builder, nv) as columns:
                v = columns.index
                words = []
                for k in range(unit_words):
                    addr = builder.add(builder.add(w_a, builder.mul(i64(k), w_stride)), builder.mul(v, i64(64)))
                    llvm.prefetch(builder, builder.add(addr, ahead_b))
                    words.append(load(addr, v16i, 4))
                for c0 in range(0, unit_codes, chain):
                    d = []                                         # d_t = s[g_t, j] * q_tj, exact
                    for t in range(c0, c0 + chain):
                        k, off, straddles = places[t]
                        if straddles:
                            q = builder.call(fshr, [words[k + 1], words[k], vconst(off)])
                        else:
                            q = builder.lshr(words[k], vconst(off)) if off else words[k]
                        q = builder.uitofp(builder.and_(q, vconst((1 << bits) - 1)), v16f)
                        s = load(builder.add(rows[t], builder.mul(v, i64(2 * LANES))), v16s, 2)
                        d.append(builder.fmul(llvm.f16_to_f32(builder, s), q))
                    with cgutils.for_range(builder, nr) as batch:
                        n = batch.index
                        xr = builder.add(x_a, builder.mul(n, x_stride))
                        sums = []
                        for first in (c0, c0 + 1):                 # even codes, odd codes
                            c = [splat(load(builder.add(xr, i64(4 * t)), f32, 4))
                                 for t in range(first, c0 + chain, 2)]
                            acc = builder.fmul(c[0], d[first - c0])
                            for m, t in enumerate(range(first + 2, c0 + chain, 2), start=1):
                                acc = builder.call(fma, [c[m], d[t - c0], acc])
                            sums.append(acc)
                        pa = builder.add(builder.add(part_a, builder.mul(n, part_stride)), builder.mul(v, i64(64)))
                        old = load(pa, v16f, 4)
                        builder.store(builder.fadd(old, builder.fadd(sums[0], sums[1])),
                                      builder.inttoptr(pa, v16f.as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(*([types.intp] * 12)), codegen
    return unit_rows


_unit_rows_b4 = _unit_rows(4)
_unit_rows_b3 = _unit_rows(3)
_unit_rows_b2 = _unit_rows(2)
_unit_rows_b8 = _unit_rows(8)


@intrinsic
def fma_f32(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma.f32): the scalar loops' twin of the vector unit's multiply-adds."""
    if not all(isinstance(v, types.Float) for v in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        return builder.call(fn, [context.cast(builder, v, t, types.float32)
                                 for v, t in zip(args, signature.args)])
    return types.float32(a, b, c), codegen


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _unit_columns(qw, u, bits, xg, gi, sc, part, j0, c0, c1, d):
    """The unit's products for columns c0..c1 of the block, one column at a time: _unit_rows' arithmetic in
    the same order (the columns past the last multiple of 16). d [CHAIN] float32 scratch."""
    unit_words, unit_codes = unit_shape(bits)
    chain = min(CHAIN, unit_codes)
    mask = (1 << bits) - 1
    i0 = u * unit_codes
    for j in range(c0, c1):
        for t0 in range(0, unit_codes, chain):
            for t in range(chain):
                pos = (t0 + t) * bits
                r = u * unit_words + (pos >> 5)
                pair = np.int64(qw[r, j0 + j])
                if (pos & 31) + bits > 32:
                    pair |= np.int64(qw[r + 1, j0 + j]) << 32
                q = (pair >> (pos & 31)) & mask
                d[t] = f16_to_f32(sc[gi[i0 + t0 + t], j]) * np.float32(q)
            for n in range(xg.shape[0]):
                x = xg[n, i0 + t0:i0 + t0 + chain]
                even = x[0] * d[0]
                for t in range(2, chain, 2):
                    even = fma_f32(x[t], d[t], even)
                odd = x[1] * d[1]
                for t in range(3, chain, 2):
                    odd = fma_f32(x[t], d[t], odd)
                part[n, j] += even + odd


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _tail_inputs(qw, t0, t1, bits, xg, gi, sc, acc, j0, width):
    """acc[n, j] += x[n, t] * (s[g_t, j] * q_tj) for inputs t0..t1, one at a time: the inputs past the last
    whole unit of packed words (3-bit layers whose inputs are not a multiple of 32)."""
    mask = (1 << bits) - 1
    last = qw.shape[0] - 1
    for t in range(t0, t1):
        pos = t * bits
        w = pos >> 5
        shift = pos & 31
        row0 = qw[w, j0:j0 + width]
        row1 = qw[min(w + 1, last), j0:j0 + width]
        s = sc[gi[t]]
        for j in range(width):
            q = ((np.int64(row0[j]) | (np.int64(row1[j]) << 32)) >> shift) & mask
            d = f16_to_f32(s[j]) * np.float32(q)
            for n in range(xg.shape[0]):
                acc[n, j] += xg[n, t] * d


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


@njit(parallel=True, fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def gemv_inplace(qw, xg, gi, sumx, scales, qzeros, bits, zero_add, const_zero, n_in, block, y):
    """y[n, :] = x[n, :] @ W for a few rows n, with qw the checkpoint's qweight in its ORIGINAL row order.

    qw [R, out] uint32 as mapped (no copy), xg [N, units * codes_per_unit] float32 (x zero padded to whole
    units), gi [units * codes_per_unit] int64 (g_idx, padded with group 0: padded inputs have x = 0),
    sumx [N, G] float32 per-group sums of x, scales [G, out] uint16 fp16 bits, qzeros [G, words] uint32,
    zero_add / const_zero as in gemv(). prange over column blocks of `block` columns; per block the fp16
    scales of every group are copied once into sc [G, block] (and the zeros widened into zc unless
    const_zero >= 0); then each unit of packed rows is decoded once for all N rows (module docstring), its
    products summed into part [N, block], which is added to acc every FLUSH_CODES inputs. Finally
    y = acc - sum_g sumx_g s_g z_g (zero term once per group and column, not per code).
    """
    n_rows = xg.shape[0]
    n_out = qw.shape[1]
    n_groups = scales.shape[0]
    unit_words, unit_codes = unit_shape(bits)
    n_full = min(qw.shape[0] // unit_words, n_in // unit_codes)   # units whose words and inputs all exist
    flush = max(1, FLUSH_CODES // unit_codes)                      # units per partial sum
    n_blocks = (n_out + block - 1) // block
    row_bytes = np.int64(n_out * 4)
    ahead = AHEAD_UNITS * unit_words * row_bytes
    base_w, base_x, base_g = np.int64(qw.ctypes.data), np.int64(xg.ctypes.data), np.int64(gi.ctypes.data)
    x_row = np.int64(xg.strides[0])
    for b in prange(n_blocks):
        j0 = b * block
        width = min(n_out, j0 + block) - j0
        vec = width // LANES * LANES
        sc = np.empty((n_groups, width), dtype=np.uint16)                 # [G, width]
        for g in range(n_groups):
            sc[g] = scales[g, j0:j0 + width]
        zc = np.empty((n_groups if const_zero < 0 else 1, width), dtype=np.float32)
        if const_zero < 0:
            _widen_zero_rows(qzeros, bits, zero_add, j0, width, zc)
        acc = np.zeros((n_rows, width), dtype=np.float32)                # [N, width]
        # [N, width] in rows one vector longer: rows 4 KB apart would share the same few L1 sets
        part = np.empty((n_rows, width + LANES), dtype=np.float32)[:, :width]
        d = np.empty(CHAIN, dtype=np.float32)
        base_p, base_s = np.int64(part.ctypes.data), np.int64(sc.ctypes.data)
        part_row = np.int64(part.strides[0])
        for u0 in range(0, n_full, flush):
            part[:] = 0.0
            for u in range(u0, min(n_full, u0 + flush)):
                w = base_w + u * unit_words * row_bytes + j0 * 4
                g = base_g + u * unit_codes * 8
                x = base_x + u * unit_codes * 4
                nv = vec // LANES
                if bits == 4:
                    _unit_rows_b4(base_p, part_row, n_rows, w, row_bytes, base_s, width * 2, g, x, x_row, nv, ahead)
                elif bits == 3:
                    _unit_rows_b3(base_p, part_row, n_rows, w, row_bytes, base_s, width * 2, g, x, x_row, nv, ahead)
                elif bits == 2:
                    _unit_rows_b2(base_p, part_row, n_rows, w, row_bytes, base_s, width * 2, g, x, x_row, nv, ahead)
                else:
                    _unit_rows_b8(base_p, part_row, n_rows, w, row_bytes, base_s, width * 2, g, x, x_row, nv, ahead)
                if vec < width:
                    _unit_columns(qw, u, bits, xg, gi, sc, part, j0, vec, width, d)
            for n in range(n_rows):
                for j in range(width):
                    acc[n, j] += part[n, j]
        _tail_inputs(qw, n_full * unit_codes, n_in, bits, xg, gi, sc, acc, j0, width)
        for n in range(n_rows):
            out = y[n, j0:j0 + width]
            for j in range(width):
                out[j] = acc[n, j]
            for g in range(n_groups):
                sx = sumx[n, g]
                srow = sc[g]
                if const_zero >= 0:
                    sz = sx * np.float32(const_zero)
                    for j in range(width):
                        out[j] -= sz * f16_to_f32(srow[j])
                else:
                    zrow = zc[g]
                    for j in range(width):
                        out[j] -= sx * f16_to_f32(srow[j]) * zrow[j]


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def dequantize_slab_inplace(qw, gi, scales, qzeros, bits, zero_add, n_in, j0, j1, tile):
    """tile[i, j] = W[i, j0 + j] for every input i in the ORIGINAL row order (qw as in gemv_inplace), on the
    calling thread only, GIL released (kernels/generic/slabs.py runs one per thread).

    Per STRIP-column strip the scales and zeros of every group are widened once into sc / zc [G, STRIP]; then each
    code row is decoded by kernels/generic/dequantize.py with the column loop innermost, looking up its group's rows
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
