"""Exact many-row GPTQ matmuls on register tiles shaped for AVX2's 16 ymm registers.

What it computes is avx512/gptq_tiles.py's, to the bit: the same NumPy statement (y = x @ W, W = s * (q - z)),
the same decode, the same runs, the same order of every rounding. Only the register tile is reshaped:

    avx512/gptq_tiles.py: 12 rows x 32 columns = 24 accumulators of 16 floats, 48 ymm registers on AVX2
                          (which has 16): the compiled loop spilled an accumulator on nearly every FMA.
    here:                 6 rows x 16 columns (2 vectors of 8 floats): 12 accumulators + 2 decoded weights
                          + 1 broadcast x = 15 ymm; the decode constants (mask, 2**23) and the zeros take the
                          16th or are read from the stack as memory operands.
Compiled for haswell (by the LLVM llvmlite ships), the loop over one unit of 4-bit codes (8 inputs, 96 FMAs)
holds about 45 stack loads (mostly those invariant memory operands) and 9 stack stores (an accumulator that LLVM
rotates through the stack); the 12 x 32 tile spent about 650 stack moves on 384 FMAs. Tried and dropped: 12 x 8
(one vector, 12 accumulators: 4 decode operations for 12 FMAs, but 12 broadcasts; measured slower), 4 x 24,
volatile re-reads of the words and constants to free registers (LLVM's scheduler then spilled the broadcasts),
int -> float conversion instead of 2**23 | q (one constant fewer; no measurable gain).

For every output (row r, column j) the arithmetic is the 12 x 32 tile's: one fused multiply-add per input into
one float32 accumulator, over the same runs (split_runs / FLUSH_CODES) in the same order, folded into y the same
way. So the results are bit for bit those of avx512/gptq_tiles.py (tests/test_kernels_avx2_prefill.py checks
it), and so within float32 round-off of float64 by the same argument:
  - (2**23 | q) read as a float32 is 2**23 + q; minus 2**23 + z (made once per group) it is q - z, exactly;
  - "segments": acc = sum_i fma(x[r, i], q - z), a run of at most 128 inputs of one group; y = fma(acc, s, y);
  - "inplace": d = (q - z[g_i]) * s[g_i] is exact (11 bits of scale times |q - z| <= 15),
    acc = sum of fma(x, d) over a run of FLUSH_CODES inputs; y += acc.
Every product is rounded once; every output is a sum of runs of at most 128 products.

Layout, shared with the 12 x 32 tiles (imported from avx512/gptq_tiles.py, not copied): x is packed once per
call by pack_x into xpk [tiles, inputs, SLOTS=12] for row tiles of 12, 8 or 4 (row_tiles); a packed tile is run
as sub-tiles of ROWS rows (the slot offset moves, the packing does not). Chunks of inputs (chunk_runs), slab
widths (slab_columns), per-tile scales and zeros of in-place layers (_fill_tile_groups, [32-column tile, G, 32])
are the 12 x 32 tiles' too.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import llvm
from ..avx512.gptq_tiles import (AHEAD_UNITS, CHUNK_INPUTS, FLUSH_CODES, MAGIC, SLOTS, _code, _fill_tile_groups,
                                 _fill_zeros, chunk_runs, pack_x, row_tiles, slab_columns, split_runs, supports)
from ..avx512.gptq_tiles import TILE_COLUMNS as PACK_COLUMNS     # the [.., G, 32] blocks of _fill_tile_groups
from ..generic.gptq_inplace import _code_places, fma_f32
from ..generic.gptq_passes import PASS_MATH, unit_shape
from ..generic.half import f16_to_f32

LANES = 8              # float32 lanes of a ymm register
VECS = 2               # vectors per tile: 16 output columns
ROWS = 6               # rows per register tile: 6 x 2 = 12 accumulators + 2 decoded weights + 1 broadcast x
SUB_ROWS = (6, 4, 2)   # register tiles generated: a packed tile of 12 rows runs as 6 + 6, of 8 as 4 + 4, 4 as 4
COLUMNS = LANES * VECS

__all__ = ["tiles_matmul", "supports", "slab_segments", "slab_inplace", "pack_x", "row_tiles"]


def _tile(bits, rows, inplace, zero_once):
    """An LLVM intrinsic: one run of units [u0, u1) of packed words for a tile of `rows` rows x COLUMNS columns.

    Register budget (ymm, 8 floats): rows * VECS accumulators, VECS decoded weights, 1 broadcast x; at
    rows = 6, VECS = 2 that is 15 of 16, and the constants (mask, 2**23 + z, the in-place scales) are read as
    memory operands from L1. Arguments and arithmetic as avx512/gptq_tiles._tile (one FMA per input into each
    accumulator; segments: y = fma(acc, s, y); inplace: d = (q - z[g]) * s[g], y += acc), with x at slot r of
    xp (xp already offset to the sub-tile's first slot)."""
    unit_words, unit_codes = unit_shape(bits)
    places = _code_places(bits)

    @intrinsic
    def tile(typingctx, y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead):
        def codegen(context, builder, signature, args):
            y_a, y_stride, xp_a, w_a, w_stride, u_lo, u_hi, sc_a, sc_stride, zm_a, zm_stride, gi_a, ahead_b = args
            I64, F32 = llvm.I64, llvm.F32
            vi, vf = llvm.vec(llvm.I32, LANES), llvm.vec(F32, LANES)
            vs = llvm.vec(llvm.I16, LANES)
            vh = llvm.vec(ir.HalfType(), LANES)

            def at(addr, nbytes):
                return builder.add(addr, nbytes if not isinstance(nbytes, int) else I64(nbytes))

            def vconst(value):
                return ir.Constant(vi, [value] * LANES)

            # The accumulators live in allocas that LLVM promotes to registers (mem2reg).
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * LANES)) for _ in range(VECS)]
                   for _ in range(rows)]
            if zero_once:                                # one zero row: its 2**23 + z, loaded once
                zmv = [llvm.load(builder, at(zm_a, 4 * LANES * v), vf) for v in range(VECS)]
            with cgutils.for_range(builder, builder.sub(u_hi, u_lo)) as loop:
                u = builder.add(u_lo, loop.index)
                wu = at(w_a, builder.mul(builder.mul(u, I64(unit_words)), w_stride))
                words = []
                for v in range(VECS):
                    per_v = []
                    for k in range(unit_words):
                        addr = at(at(wu, builder.mul(I64(k), w_stride)), 4 * LANES * v)
                        if (4 * LANES * v) % 64 == 0:    # one prefetch per 64-byte line of the packed row
                            llvm.prefetch(builder, at(addr, ahead_b))
                        per_v.append(llvm.load(builder, addr, vi))
                    words.append(per_v)
                xu = at(xp_a, builder.mul(u, I64(4 * SLOTS * unit_codes)))
                for t in range(unit_codes):
                    k, off, straddles = places[t]
                    if inplace:
                        g = llvm.load(builder, at(gi_a, builder.mul(builder.add(builder.mul(u, I64(unit_codes)),
                                                                                I64(t)), I64(8))), I64, 8)
                        sc_g = at(sc_a, builder.mul(g, sc_stride))
                        if not zero_once:
                            zm_g = at(zm_a, builder.mul(g, zm_stride))
                    d = []
                    for v in range(VECS):
                        if straddles:
                            q = llvm.call(builder, "llvm.fshr.v8i32", [words[v][k + 1], words[v][k], vconst(off)], vi)
                        else:
                            q = builder.lshr(words[v][k], vconst(off)) if off else words[v][k]
                        q = builder.bitcast(builder.or_(builder.and_(q, vconst((1 << bits) - 1)), vconst(MAGIC)), vf)
                        if inplace:                                                   # s * (q - z), exact
                            z = zmv[v] if zero_once else llvm.load(builder, at(zm_g, 4 * LANES * v), vf)
                            d.append(builder.fmul(builder.fsub(q, z), llvm.load(builder, at(sc_g, 4 * LANES * v), vf)))
                        else:
                            d.append(builder.fsub(q, zmv[v]))                         # q - z, exact
                    for r in range(rows):
                        xb = llvm.splat(builder, llvm.load(builder, at(xu, 4 * (SLOTS * t + r)), F32), vf)
                        for v in range(VECS):
                            builder.store(llvm.call(builder, "llvm.fma.v8f32", [xb, d[v], builder.load(acc[r][v])], vf),
                                          acc[r][v])
            for r in range(rows):
                for v in range(VECS):
                    addr = at(at(y_a, builder.mul(I64(r), y_stride)), 4 * LANES * v)
                    old = llvm.load(builder, addr, vf)
                    a = builder.load(acc[r][v])
                    if inplace:
                        new = builder.fadd(old, a)
                    else:
                        s = builder.fpext(builder.bitcast(llvm.load(builder, at(sc_a, 2 * LANES * v), vs, 2), vh), vf)
                        new = llvm.call(builder, "llvm.fma.v8f32", [a, s, old], vf)
                    llvm.store(builder, new, addr)
            return context.get_dummy_value()
        return types.void(*([types.intp] * 13)), codegen
    return tile


_seg4 = [_tile(4, r, False, True) for r in SUB_ROWS]
_seg3 = [_tile(3, r, False, True) for r in SUB_ROWS]
_inp4 = [_tile(4, r, True, False) for r in SUB_ROWS]
_inp3 = [_tile(3, r, True, False) for r in SUB_ROWS]
_sym4 = [_tile(4, r, True, True) for r in SUB_ROWS]
_sym3 = [_tile(3, r, True, True) for r in SUB_ROWS]
_s4a, _s4b, _s4c = _seg4
_s3a, _s3b, _s3c = _seg3
_i4a, _i4b, _i4c = _inp4
_i3a, _i3b, _i3c = _inp3
_z4a, _z4b, _z4c = _sym4
_z3a, _z3b, _z3c = _sym3
_RA, _RB = SUB_ROWS[0], SUB_ROWS[1]


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def _sub_rows(rows):
    """Rows of the register tiles a packed tile of `rows` (12, 8 or 4: row_tiles) is run as: the largest of
    SUB_ROWS that divides it."""
    if rows % _RA == 0:
        return _RA
    if rows % _RB == 0:
        return _RB
    return SUB_ROWS[2]


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def tile_segments(bits, rows, y, y_row, xp, w, w_row, u0, u1, sc, zm, ahead):
    """The segments register tile of (bits, rows): one group's run of units (see _tile)."""
    if bits == 4:
        if rows == _RA:
            _s4a(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)
        elif rows == _RB:
            _s4b(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)
        else:
            _s4c(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)
    else:
        if rows == _RA:
            _s3a(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)
        elif rows == _RB:
            _s3b(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)
        else:
            _s3c(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def tile_inplace(bits, rows, y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead):
    """The inplace register tile of (bits, rows); zm_row == 0 means one zero for every group."""
    if zm_row == 0:
        if bits == 4:
            if rows == _RA:
                _z4a(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
            elif rows == _RB:
                _z4b(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
            else:
                _z4c(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
        else:
            if rows == _RA:
                _z3a(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
            elif rows == _RB:
                _z3b(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
            else:
                _z3c(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
    elif bits == 4:
        if rows == _RA:
            _i4a(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
        elif rows == _RB:
            _i4b(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
        else:
            _i4c(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
    else:
        if rows == _RA:
            _i3a(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
        elif rows == _RB:
            _i3b(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
        else:
            _i3c(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def slab_segments(qw, xpk, row_start, runs, run_group, chunks, scales, qzeros, bits, zero_add, const_zero,
                  j0, j1, zm, y):
    """y[:, j0:j1] = x @ W[:, j0:j1] for a "segments" plan, on the calling thread (GIL released): the arguments
    and loop order of avx512/gptq_tiles.slab_segments, with register tiles of ROWS x COLUMNS. Columns past the
    last multiple of COLUMNS take the same arithmetic one at a time."""
    unit_words, unit_codes = unit_shape(bits)
    width = j1 - j0
    full = width // COLUMNS * COLUMNS
    n_out = qw.shape[1]
    _fill_zeros(qzeros, bits, zero_add, const_zero, j0, width, zm)
    zm_row = np.int64(zm.strides[0]) if const_zero < 0 else np.int64(0)
    for n in range(y.shape[0]):
        y[n, j0:j1] = 0.0
    w_row = np.int64(4 * n_out)
    sc_row = np.int64(2 * n_out)
    y_row = np.int64(y.strides[0])
    x_tile = np.int64(xpk.strides[0])
    ahead = np.int64(AHEAD_UNITS * unit_words) * w_row
    base_y, base_x = np.int64(y.ctypes.data), np.int64(xpk.ctypes.data)
    base_w, base_s, base_z = np.int64(qw.ctypes.data), np.int64(scales.ctypes.data), np.int64(zm.ctypes.data)
    for c in range(chunks.shape[0] - 1):
        for t in range(row_start.shape[0] - 1):
            rows_t = row_start[t + 1] - row_start[t]
            sub = _sub_rows(rows_t)
            for r0 in range(0, rows_t, sub):
                yt = base_y + (row_start[t] + r0) * y_row + 4 * j0
                xt = base_x + t * x_tile + 4 * r0
                for m in range(0, full, COLUMNS):
                    for s in range(chunks[c], chunks[c + 1]):
                        g = run_group[s]
                        tile_segments(bits, sub, yt + 4 * m, y_row, xt, base_w + 4 * (j0 + m), w_row, runs[s],
                                      runs[s + 1], base_s + g * sc_row + 2 * (j0 + m), base_z + g * zm_row + 4 * m,
                                      ahead)
    for j in range(j0 + full, j1):                      # the last columns, one at a time
        for t in range(row_start.shape[0] - 1):
            for r in range(row_start[t + 1] - row_start[t]):
                n = row_start[t] + r
                for s in range(runs.shape[0] - 1):
                    g = run_group[s]
                    zg = zm[g if const_zero < 0 else 0, j - j0] - np.float32(2.0 ** 23)
                    acc = np.float32(0.0)
                    for i in range(runs[s] * unit_codes, runs[s + 1] * unit_codes):
                        acc = fma_f32(xpk[t, i, r], np.float32(_code(qw, i, j, bits)) - zg, acc)
                    y[n, j] = fma_f32(acc, f16_to_f32(scales[g, j]), y[n, j])


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def slab_inplace(qw, xpk, row_start, gi, n_units, scales, qzeros, bits, zero_add, const_zero, j0, j1, sc, zm, y):
    """y[:, j0:j1] = x @ W[:, j0:j1] for an "inplace" plan: the arguments, scratch (sc, zm [32-column tiles, G,
    32], _fill_tile_groups) and loop order of avx512/gptq_tiles.slab_inplace, with register tiles of ROWS x
    COLUMNS (a tile at column m reads lanes m % 32.. of the 32-column tile m // 32)."""
    unit_words, unit_codes = unit_shape(bits)
    width = j1 - j0
    full = width // COLUMNS * COLUMNS
    n_out = qw.shape[1]
    _fill_tile_groups(scales, qzeros, bits, zero_add, const_zero, j0, width, sc, zm)
    for n in range(y.shape[0]):
        y[n, j0:j1] = 0.0
    flush = max(1, FLUSH_CODES // unit_codes)
    per_chunk = max(1, CHUNK_INPUTS // FLUSH_CODES) * flush
    w_row = np.int64(4 * n_out)
    y_row = np.int64(y.strides[0])
    x_tile = np.int64(xpk.strides[0])
    sc_row, sc_tile = np.int64(sc.strides[1]), np.int64(sc.strides[0])
    zm_row = np.int64(zm.strides[1]) if const_zero < 0 else np.int64(0)
    zm_tile = np.int64(zm.strides[0]) if const_zero < 0 else np.int64(0)
    ahead = np.int64(AHEAD_UNITS * unit_words) * w_row
    base_y, base_x, base_g = np.int64(y.ctypes.data), np.int64(xpk.ctypes.data), np.int64(gi.ctypes.data)
    base_w, base_s, base_z = np.int64(qw.ctypes.data), np.int64(sc.ctypes.data), np.int64(zm.ctypes.data)
    for c0 in range(0, n_units, per_chunk):
        c1 = min(n_units, c0 + per_chunk)
        for t in range(row_start.shape[0] - 1):
            rows_t = row_start[t + 1] - row_start[t]
            sub = _sub_rows(rows_t)
            for r0 in range(0, rows_t, sub):
                yt = base_y + (row_start[t] + r0) * y_row + 4 * j0
                xt = base_x + t * x_tile + 4 * r0
                for m in range(0, full, COLUMNS):
                    tile, lane = m // PACK_COLUMNS, 4 * (m % PACK_COLUMNS)
                    z_at = base_z + tile * zm_tile + (lane if const_zero < 0 else 0)
                    for u0 in range(c0, c1, flush):
                        tile_inplace(bits, sub, yt + 4 * m, y_row, xt, base_w + 4 * (j0 + m), w_row, u0,
                                     min(c1, u0 + flush), base_s + tile * sc_tile + lane, sc_row, z_at, zm_row,
                                     base_g, ahead)
    for j in range(full, width):                        # the last columns, one at a time
        m, lane = j // PACK_COLUMNS, j % PACK_COLUMNS
        for t in range(row_start.shape[0] - 1):
            for r in range(row_start[t + 1] - row_start[t]):
                n = row_start[t] + r
                for u0 in range(0, n_units, flush):
                    acc = np.float32(0.0)
                    for i in range(u0 * unit_codes, min(n_units, u0 + flush) * unit_codes):
                        g = gi[i]
                        z = zm[m, g, lane] if const_zero < 0 else zm[0, 0, 0]
                        d = (np.float32(_code(qw, i, j0 + j, bits)) - (z - np.float32(2.0 ** 23))) * sc[m, g, lane]
                        acc = fma_f32(xpk[t, i, r], d, acc)
                    y[n, j0 + j] += acc


def tiles_matmul(plan, x):
    """y [N, out] float32 = x [N, in] float32 (input order) @ W, for a 3- or 4-bit plan of either layout
    (supports(plan)): gptq._tiles_matmul's contract and steps (x packed once in the plan's row order, slabs of
    columns spread over the threads), on these register tiles."""
    return matmul_on(plan, x, slab_segments, slab_inplace)


def matmul_on(plan, x, segments, inplace):
    """tiles_matmul with the slab kernels given: these (slab_segments, slab_inplace) or avx512/gptq_tiles.py's,
    which take the same arguments (the tests compare the two tiles through the same steps)."""
    import numba
    from ..generic.slabs import run_slabs
    n_rows, n_out = x.shape[0], plan.qw.shape[1]
    unit_codes = unit_shape(plan.bits)[1]
    row_start = np.concatenate([[0], np.cumsum(row_tiles(n_rows))]).astype(np.int64)        # [T + 1]
    gather = plan.gather if plan.perm is not None else np.minimum(np.arange(plan.n_padded), plan.n_in)
    xpk = np.empty((len(row_start) - 1, plan.n_padded, SLOTS), dtype=np.float32)            # [T, K, 12]
    pack_x(np.ascontiguousarray(x, dtype=np.float32), gather, row_start, xpk)
    y = np.empty((row_start[-1], n_out), dtype=np.float32)                                   # [Np, out]
    columns = slab_columns(n_out, n_rows, numba.get_num_threads())
    scratch = {}

    def with_scratch(make, work):
        def lane(j0, j1, worker):
            if worker not in scratch:
                scratch[worker] = make()
            work(j0, j1, *scratch[worker])
        run_slabs(n_out, columns, lane)

    if plan.layout == "segments":
        zero_rows = plan.scales.shape[0] if plan.const_zero < 0 else 1
        runs, run_group = split_runs(plan.seg_start, plan.seg_group, plan.bits)
        chunks = chunk_runs(runs, plan.bits)
        with_scratch(lambda: (np.empty((zero_rows, columns), dtype=np.float32),),          # [G or 1, columns]
                     lambda j0, j1, zm: segments(plan.qw, xpk, row_start, runs, run_group, chunks, plan.scales,
                                                      plan.qzeros, plan.bits, plan.zero_add, plan.const_zero, j0,
                                                      j1, zm, y))
    else:
        shape = (-(-columns // PACK_COLUMNS), plan.n_groups, PACK_COLUMNS)                  # [32-col tiles, G, 32]
        zshape = shape if plan.const_zero < 0 else (1, 1, PACK_COLUMNS)
        with_scratch(lambda: (np.empty(shape, dtype=np.float32), np.empty(zshape, dtype=np.float32)),
                     lambda j0, j1, sc, zm: inplace(plan.qw, xpk, row_start, plan.g_idx,
                                                         plan.n_padded // unit_codes, plan.scales, plan.qzeros,
                                                         plan.bits, plan.zero_add, plan.const_zero, j0, j1, sc,
                                                         zm, y))
    return y[:n_rows]
