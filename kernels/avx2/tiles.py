"""Exact many-row GPTQ matmuls on register tiles shaped for AVX2's 16 ymm registers.

What it computes is avx512/gptq_tiles.py's, to the bit: the same NumPy statement (y = x @ W, W = s * (q - z)),
the same decoded values, the same runs, the same order of every rounding. Only the register tile is reshaped,
and the decode moved out of it:

    avx512/gptq_tiles.py: 12 rows x 32 columns = 24 accumulators of 16 floats (48 ymm registers on AVX2, which
                          has 16: the compiled loop spent about 650 stack moves on 384 FMAs), each weight
                          decoded inside the tile, once per tile of rows.
    here:                 per run (at most 128 inputs) and 16 columns, the weights are decoded ONCE into a panel
                          [inputs, 16] float32 (8 KB, stays in L1, decode_panel), and every tile of rows reads
                          it: the register tile is 6 rows x 16 columns (2 vectors of 8 floats), 12 accumulators
                          + 2 weights + 1 broadcast x = 15 ymm, no constants. Compiled for haswell, its loop is
                          24 instructions per input: 2 panel loads, 6 broadcasts, 12 FMAs, no stack access.
Decoding inside a 6 x 16 tile (shift, AND, OR, subtract per vector: 8 operations per 12 FMAs, competing with
them for the vector pipes; LLVM also rotated an accumulator through the stack) ran at 57-62 GFLOP/s on one
core against 76-83 with the panel (Zen 4 capped to AVX2, 4096 x 4096, 64 and 512 rows); 12 x 8 and 4 x 24
register tiles, volatile re-reads of the constants, and int -> float conversion instead of 2**23 | q were
slower or no better.

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
as register tiles of 6 or 4 rows (the slot offset moves, the packing does not). Chunks of inputs (chunk_runs),
slab widths (slab_columns), per-tile scales and zeros of in-place layers (_fill_tile_groups, [32-column tile,
G, 32]) and the scalar loops of a slab's last columns (_tail_segments, _tail_inplace) are the 12 x 32 tiles' too. Loop order within a slab: chunk of inputs -> block of BLOCK_TILES packed
tiles of rows (their x of the chunk stays in L2) -> 16 columns -> run (decode its panel) -> every tile of rows
of the block.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import llvm
from ..avx512.gptq_tiles import (AHEAD_UNITS, CHUNK_INPUTS, FLUSH_CODES, MAGIC, SLOTS, _fill_tile_groups, _start_slab,
                                 _tail_inplace, _tail_segments, chunk_runs, pack_x, row_tiles, slab_columns,
                                 split_runs, supports)
from ..avx512.gptq_tiles import TILE_COLUMNS as PACK_COLUMNS     # the [.., G, 32] blocks of _fill_tile_groups
from ..generic import strips
from ..generic.gptq_inplace import _code_places
from ..generic.gptq_passes import PASS_MATH, unit_shape

LANES = 8              # float32 lanes of a ymm register
VECS = 2               # vectors per tile: 16 output columns
ROWS = 6               # rows per register tile: 6 x 2 = 12 accumulators + 2 panel weights + 1 broadcast x
SUB_ROWS = (6, 4, 2)   # register tiles generated: a packed tile of 12 rows runs as 6 + 6, of 8 as 4 + 4, 4 as 4
COLUMNS = LANES * VECS
BLOCK_TILES = 11       # packed tiles of rows (132 rows) that share a decoded panel: their chunk of x (132 x 512
                       # floats, 264 KB) stays in L2 while the panel goes round them

__all__ = ["tiles_matmul", "matmul_on", "supports", "slab_segments", "slab_inplace", "decode_panel",
           "panel_tile"]


def _panel(bits, inplace, zero_once):
    """An LLVM intrinsic: decode units [u0, u1) of a run for COLUMNS columns into panel [inputs, COLUMNS] float32
    (64 bytes a row): d = q - z (segments) or s[g_i] * (q - z[g_i]) (inplace), the very values (both exact) that
    avx512/gptq_tiles._tile decodes in its registers, by the same steps. Arguments (int64 byte addresses and
    strides, as _tile's): panel; w (packed word row 0, the first column), w_row; u0, u1; sc, sc_row (inplace:
    float32 scales of group 0 in a [G, 32] block); zm, zm_row (float32 rows of 2**23 + zero; zero_once: one
    row); gi (inplace: g_idx at input 0); ahead (bytes from a packed word to the one to prefetch).
    Registers: the unit's packed words (2 or 6), the constants, one decoded vector at a time."""
    unit_words, unit_codes = unit_shape(bits)
    places = _code_places(bits)

    @intrinsic
    def panel(typingctx, pn, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead):
        def codegen(context, builder, signature, args):
            pn_a, w_a, w_stride, u_lo, u_hi, sc_a, sc_stride, zm_a, zm_stride, gi_a, ahead_b = args
            I64 = llvm.I64
            vi, vf = llvm.vec(llvm.I32, LANES), llvm.vec(llvm.F32, LANES)

            def at(addr, nbytes):
                return builder.add(addr, nbytes if not isinstance(nbytes, int) else I64(nbytes))

            def vconst(value):
                return ir.Constant(vi, [value] * LANES)

            if zero_once:
                zmv = [llvm.load(builder, at(zm_a, 4 * LANES * v), vf) for v in range(VECS)]
            with cgutils.for_range(builder, builder.sub(u_hi, u_lo)) as loop:
                u = builder.add(u_lo, loop.index)
                wu = at(w_a, builder.mul(builder.mul(u, I64(unit_words)), w_stride))
                for k in range(unit_words):                 # the 16 columns' 64 bytes: one line per row
                    llvm.prefetch(builder, at(at(wu, builder.mul(I64(k), w_stride)), ahead_b))
                words = [[llvm.load(builder, at(at(wu, builder.mul(I64(k), w_stride)), 4 * LANES * v), vi)
                          for k in range(unit_words)] for v in range(VECS)]
                row0 = at(pn_a, builder.mul(loop.index, I64(4 * COLUMNS * unit_codes)))
                for t in range(unit_codes):
                    k, off, straddles = places[t]
                    if inplace:
                        g = llvm.load(builder, at(gi_a, builder.mul(builder.add(builder.mul(u, I64(unit_codes)),
                                                                                I64(t)), I64(8))), I64, 8)
                        sc_g = at(sc_a, builder.mul(g, sc_stride))
                        if not zero_once:
                            zm_g = at(zm_a, builder.mul(g, zm_stride))
                    for v in range(VECS):
                        if straddles:
                            q = llvm.call(builder, "llvm.fshr.v8i32", [words[v][k + 1], words[v][k], vconst(off)], vi)
                        else:
                            q = builder.lshr(words[v][k], vconst(off)) if off else words[v][k]
                        q = builder.bitcast(builder.or_(builder.and_(q, vconst((1 << bits) - 1)), vconst(MAGIC)), vf)
                        if inplace:
                            z = zmv[v] if zero_once else llvm.load(builder, at(zm_g, 4 * LANES * v), vf)
                            d = builder.fmul(builder.fsub(q, z), llvm.load(builder, at(sc_g, 4 * LANES * v), vf))
                        else:
                            d = builder.fsub(q, zmv[v])
                        llvm.store(builder, d, at(row0, 4 * (COLUMNS * t + LANES * v)))
            return context.get_dummy_value()
        return types.void(*([types.intp] * 11)), codegen
    return panel


def _ptile(rows, inplace):
    """An LLVM intrinsic: a tile of `rows` rows x COLUMNS columns over n inputs of a decoded panel: per input
    the panel's 2 vectors are loaded once and every row adds fma(x, d, acc); then y = fma(acc, s, y) (segments,
    s the fp16 scales at sc) or y += acc (inplace). Register budget (ymm, 8 floats): rows x 2 accumulators
    (12 at 6 rows) + 2 weights + 1 broadcast x, no constants: 15 of 16. Arguments: y (row 0, the tile's first
    column), y_row; xp (packed x of the register tile's first slot at the run's first input); panel; n inputs;
    sc (segments: the group's fp16 scales at the tile's first column)."""

    @intrinsic
    def ptile(typingctx, y, y_row, xp, pn, n, sc):
        def codegen(context, builder, signature, args):
            y_a, y_stride, xp_a, pn_a, n_in, sc_a = args
            I64, F32 = llvm.I64, llvm.F32
            vf, vs, vh = llvm.vec(F32, LANES), llvm.vec(llvm.I16, LANES), llvm.vec(ir.HalfType(), LANES)

            def at(addr, nbytes):
                return builder.add(addr, nbytes if not isinstance(nbytes, int) else I64(nbytes))

            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * LANES)) for _ in range(VECS)]
                   for _ in range(rows)]
            with cgutils.for_range(builder, n_in) as loop:
                i = loop.index
                row = at(pn_a, builder.mul(i, I64(4 * COLUMNS)))
                d = [llvm.load(builder, at(row, 4 * LANES * v), vf) for v in range(VECS)]
                xi = at(xp_a, builder.mul(i, I64(4 * SLOTS)))
                for r in range(rows):
                    xb = llvm.splat(builder, llvm.load(builder, at(xi, 4 * r), F32), vf)
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
        return types.void(*([types.intp] * 6)), codegen
    return ptile


_pd_s4, _pd_s3 = _panel(4, False, True), _panel(3, False, True)
_pd_i4, _pd_i3 = _panel(4, True, False), _panel(3, True, False)
_pd_z4, _pd_z3 = _panel(4, True, True), _panel(3, True, True)
_pt_s6, _pt_s4, _pt_s2 = (_ptile(r, False) for r in SUB_ROWS)
_pt_i6, _pt_i4, _pt_i2 = (_ptile(r, True) for r in SUB_ROWS)
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
def decode_panel(bits, inplace, pn, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead):
    """The panel decode of (bits, layout) (_panel); inplace with zm_row == 0: one zero for every group."""
    if not inplace:
        if bits == 4:
            _pd_s4(pn, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
        else:
            _pd_s3(pn, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
    elif zm_row == 0:
        if bits == 4:
            _pd_z4(pn, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
        else:
            _pd_z3(pn, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
    else:
        if bits == 4:
            _pd_i4(pn, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
        else:
            _pd_i3(pn, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def panel_tile(inplace, rows, y, y_row, xp, pn, n, sc):
    """The register tile of (layout, rows) over one panel (_ptile)."""
    if inplace:
        if rows == _RA:
            _pt_i6(y, y_row, xp, pn, n, sc)
        elif rows == _RB:
            _pt_i4(y, y_row, xp, pn, n, sc)
        else:
            _pt_i2(y, y_row, xp, pn, n, sc)
    else:
        if rows == _RA:
            _pt_s6(y, y_row, xp, pn, n, sc)
        elif rows == _RB:
            _pt_s4(y, y_row, xp, pn, n, sc)
        else:
            _pt_s2(y, y_row, xp, pn, n, sc)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def _panel_rows(inplace, rows_start, t0, t1, y_base, y_row, x_base, x_tile, pn, i0, n, sc):
    """One decoded panel (inputs i0..i0+n, COLUMNS columns) into the packed row tiles t0..t1."""
    for t in range(t0, t1):
        rows_t = rows_start[t + 1] - rows_start[t]
        sub = _sub_rows(rows_t)
        for r0 in range(0, rows_t, sub):
            panel_tile(inplace, sub, y_base + (rows_start[t] + r0) * y_row, y_row,
                       x_base + t * x_tile + 4 * r0 + 4 * SLOTS * i0, pn, n, sc)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def slab_segments(qw, xpk, row_start, runs, run_group, chunks, scales, qzeros, bits, zero_add, const_zero,
                  j0, j1, zm, y):
    """y[:, j0:j1] = x @ W[:, j0:j1] for a "segments" plan, on the calling thread (GIL released): the arguments
    of avx512/gptq_tiles.slab_segments, and for every output the same products and sums in the same order;
    the decode done once per (run, 16 columns) into a panel that every tile of rows reads. Columns past the
    last multiple of 16 take the same arithmetic one at a time. qw [S * R, W] in either layout of
    generic/strips.py (a plan in strips has whole strips of 32 or 64 columns, so no such last columns)."""
    unit_codes = unit_shape(bits)[1]
    full = (j1 - j0) // COLUMNS * COLUMNS
    qw_width, n_packed, w_row, sc_row, zm_row, ahead = _start_slab(qw, qzeros, bits, zero_add, const_zero, j0, j1,
                                                                   zm, y)
    pn = np.empty((FLUSH_CODES + 32) * COLUMNS, dtype=np.float32)    # one run's panel [inputs, 16]: 8 KB
    pn_a = np.int64(pn.ctypes.data)
    y_row = np.int64(y.strides[0])
    x_tile = np.int64(xpk.strides[0])
    base_y, base_x = np.int64(y.ctypes.data), np.int64(xpk.ctypes.data)
    base_w, base_s, base_z = np.int64(qw.ctypes.data), np.int64(scales.ctypes.data), np.int64(zm.ctypes.data)
    n_tiles = row_start.shape[0] - 1
    for c in range(chunks.shape[0] - 1):
        for t0 in range(0, n_tiles, BLOCK_TILES):
            t1 = min(n_tiles, t0 + BLOCK_TILES)
            for m in range(0, full, COLUMNS):
                for s in range(chunks[c], chunks[c + 1]):
                    g = run_group[s]
                    decode_panel(bits, False, pn_a, base_w + strips.word_offset(qw_width, n_packed, 0, j0 + m),
                                 w_row, runs[s], runs[s + 1], 0, 0,
                                 base_z + g * zm_row + 4 * m, 0, 0, ahead)
                    _panel_rows(False, row_start, t0, t1, base_y + 4 * (j0 + m), y_row, base_x, x_tile, pn_a,
                                runs[s] * unit_codes, (runs[s + 1] - runs[s]) * unit_codes,
                                base_s + g * sc_row + 2 * (j0 + m))
    _tail_segments(qw, xpk, row_start, runs, run_group, scales, bits, const_zero, j0, j0 + full, j1, zm, y)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def slab_inplace(qw, xpk, row_start, gi, n_units, scales, qzeros, bits, zero_add, const_zero, j0, j1, sc, zm, y):
    """y[:, j0:j1] = x @ W[:, j0:j1] for an "inplace" plan (qw in the checkpoint's row order, gi the group of
    every input): the arguments and scratch of avx512/gptq_tiles.slab_inplace (sc, zm [32-column tiles, G, 32],
    _fill_tile_groups), the same products and sums; the decode (s[g_i] * (q - z[g_i])) done once per (run of
    FLUSH_CODES inputs, 16 columns) into a panel that every tile of rows reads."""
    unit_words, unit_codes = unit_shape(bits)
    width = j1 - j0
    full = width // COLUMNS * COLUMNS
    n_out = qw.shape[1]
    _fill_tile_groups(scales, qzeros, bits, zero_add, const_zero, j0, width, sc, zm)
    for n in range(y.shape[0]):
        y[n, j0:j1] = 0.0
    flush = max(1, FLUSH_CODES // unit_codes)
    per_chunk = max(1, CHUNK_INPUTS // FLUSH_CODES) * flush
    pn = np.empty((FLUSH_CODES + 32) * COLUMNS, dtype=np.float32)    # one run's panel [inputs, 16]: 8 KB
    pn_a = np.int64(pn.ctypes.data)
    w_row = np.int64(4 * n_out)
    ahead = np.int64(AHEAD_UNITS * unit_words) * w_row
    y_row = np.int64(y.strides[0])
    x_tile = np.int64(xpk.strides[0])
    sc_row, sc_tile = np.int64(sc.strides[1]), np.int64(sc.strides[0])
    zm_row = np.int64(zm.strides[1]) if const_zero < 0 else np.int64(0)
    zm_tile = np.int64(zm.strides[0]) if const_zero < 0 else np.int64(0)
    base_y, base_x, base_g = np.int64(y.ctypes.data), np.int64(xpk.ctypes.data), np.int64(gi.ctypes.data)
    base_w, base_s, base_z = np.int64(qw.ctypes.data), np.int64(sc.ctypes.data), np.int64(zm.ctypes.data)
    n_tiles = row_start.shape[0] - 1
    for c0 in range(0, n_units, per_chunk):
        c1 = min(n_units, c0 + per_chunk)
        for t0 in range(0, n_tiles, BLOCK_TILES):
            t1 = min(n_tiles, t0 + BLOCK_TILES)
            for m in range(0, full, COLUMNS):
                tile, lane = m // PACK_COLUMNS, 4 * (m % PACK_COLUMNS)
                z_at = base_z + tile * zm_tile + (lane if const_zero < 0 else 0)
                for u0 in range(c0, c1, flush):
                    u1 = min(c1, u0 + flush)
                    decode_panel(bits, True, pn_a, base_w + 4 * (j0 + m), w_row, u0, u1,
                                 base_s + tile * sc_tile + lane, sc_row, z_at, zm_row, base_g, ahead)
                    _panel_rows(True, row_start, t0, t1, base_y + 4 * (j0 + m), y_row, base_x, x_tile, pn_a,
                                u0 * unit_codes, (u1 - u0) * unit_codes, 0)
    _tail_inplace(qw, xpk, row_start, gi, n_units, bits, const_zero, j0, full, width, sc, zm, y)


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
    n_rows, n_out = x.shape[0], plan.n_out
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
