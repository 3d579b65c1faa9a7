"""Many-row GPTQ matmuls on register tiles that decode the packed codes themselves (CPUs without AMX).

The other prefill path (gptq_prefill.py + slabs.py) widens a slab of W to float32 and hands it to BLAS. At 64
rows BLAS spends only 128 flops per weight, so widening the slab costs 15% of the pass, and BLAS on such short,
wide operands runs at 0.76 of its big-GEMM rate. Here the codes go straight from their packed words into the
multiply-adds, the way a BLAS micro-kernel works from its packed panels:

    for a tile of R activation rows (R = 12, 8 or 4) and 32 output columns (two AVX-512 vectors):
        24 accumulators (R x 2 vectors) stay in registers over a run of inputs;
        per input i, the 32 weights are decoded ONCE (shift, AND/OR, subtract) and every row r adds
        x[r, i] * d  -- the decode is shared by the R rows, as a BLAS kernel shares a loaded B vector.

The decoded weight is exact:
  - (2**23 | q) read as a float32 is 2**23 + q, so subtracting 2**23 + z (made once per group) gives q - z
    with no rounding and no int -> float conversion;
  - "segments" layouts (resident layers, input rows sorted by group): d = q - z; a group's run of inputs ends
    with y += acc * s, the group's scale, once per 128 inputs;
  - "inplace" layouts (streamed act-order layers in checkpoint order, where neighbouring inputs belong to
    different groups): d = s[g_i] * (q - z[g_i]), exact too (11 bits of scale times at most 8 of code), and
    the accumulators go into y every FLUSH_CODES inputs.
So every product x * d is rounded once, and each output is a sum of runs of at most 128 products: about as
deep as BLAS's own float32 sums (tests/test_kernels_tiles.py compares with float64).

Blocking (what sits where while the tile runs), for a slab of output columns:
  - x is packed once per call into xpk [tiles, inputs, 12]: the tile's 12 values of input i are adjacent, so
    a step reads one or two cache lines instead of 12 rows 16-44 KB apart (which share L1 sets);
  - the inputs are taken in chunks of about CHUNK_INPUTS: a tile's chunk of x (12 x 512 floats, 24 KB) stays
    in L1 while it visits every 32 columns of the slab, and the slab's chunk of codes stays in L2 while the
    tiles of rows visit it.
The slabs are spread over the threads by kernels/generic/slabs.py (dynamic: a preempted thread simply takes fewer).
The inner step is LLVM IR (an intrinsic per bit width, layout and R): Numba has no vector types, and left to
itself it would not keep 24 accumulators in registers.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..generic import strips
from ..generic.gptq_gemv import _zero_code
from ..generic.gptq_inplace import _code_places, fma_f32
from ..generic.gptq_passes import PASS_MATH, unit_shape
from ..generic.half import f16_to_f32
from .. import llvm

SLOTS = 12             # floats per input in the packed x of one tile (the largest tile)
TILE_ROWS = (12, 8, 4) # rows per tile: 24, 16 or 8 accumulators of 16 floats
LANES = 16             # float32 lanes of a vector
VECS = 2               # vectors per tile: 32 output columns
TILE_COLUMNS = LANES * VECS
CHUNK_INPUTS = 512     # inputs per chunk: a tile's x (12 x 512 floats) stays in L1 over the slab's columns
FLUSH_CODES = 128      # "inplace": inputs summed in registers before the accumulators are added to y
MAGIC = 0x4B000000     # float32 2**23: OR a code into its mantissa and it reads as 2**23 + code
BITS = (3, 4)          # bit widths with tiles (Meditron's GPTQ branches); 2 and 8 bits take the slabs
SLAB_MAX_COLUMNS = 1024 # widest slab: 1024 columns are one 4 KB page of each packed row
AHEAD_UNITS = 32       # units of packed words ahead that the tile prefetches (each packed row is its own
                       # short stream; 4 units ahead ran the 4096-input 7B shapes at 315 GFLOP/s, 32 at 430)


def _tile(bits, rows, inplace, zero_per_group=True):
    """An LLVM intrinsic: one run of units [u0, u1) of packed words for a tile of `rows` rows x 32 columns.

        segments (inplace=False): acc = sum_i x[r, i] * (q_ij - z_j) over the run (one group);
                                  y[r, j] = fma(acc, s_j, y[r, j])
        inplace:                  acc = sum_i x[r, i] * s[g_i, j] * (q_ij - z[g_i, j]);  y[r, j] += acc
    Arguments (int64 byte addresses and strides): y (row 0, the tile's first column), y_row; xp (packed x of
    the tile at input 0: input i, row r at xp + 4 * (SLOTS * i + r)); w (packed word row 0, the tile's first
    column), w_row; u0, u1; sc (segments: the group's fp16 scales at the tile's column, read once per run;
    inplace: float32 scales of group 0 in the tile's [G, 32] block, _fill_tile_groups), sc_row; zm (float32
    rows of 2**23 + zero, laid out like the scales; zm_row = 0 when every group shares the zero), zm_row; gi
    (inplace: g_idx at input 0); ahead (bytes from a packed word to the one to prefetch).
    inplace with zero_per_group=False: every group shares the zero (symmetric GPTQ), so 2**23 + z is loaded once
    (zm) rather than per input (measured 5-10% faster on the 70B shapes).
    """
    zero_once = not inplace or not zero_per_group
    unit_words, unit_codes = unit_shape(bits)
    places = _code_places(bits)

    @intrinsic
    def tile(typingctx, y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead):
        def codegen(context, builder, signature, args):
            y_a, y_stride, xp_a, w_a, w_stride, u_lo, u_hi, sc_a, sc_stride, zm_a, zm_stride, gi_a, ahead_b = args
            i16, i32, i64, f32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
            v16i, v16f = ir.VectorType(i32, LANES), ir.VectorType(f32, LANES)
            v16s = ir.VectorType(i16, LANES)
            module = builder.module
            fma = llvm.declare(module, "llvm.fma.v16f32", v16f, [v16f] * 3)
            fshr = llvm.declare(module, "llvm.fshr.v16i32", v16i, [v16i] * 3)

            def load(addr, ty, align=4):
                return llvm.load(builder, addr, ty, align)

            def vconst(value):
                return ir.Constant(v16i, [value] * LANES)

            def splat(value):
                return llvm.splat(builder, value, v16f)

            def half_row(addr, v):                       # 16 fp16 scales -> float32
                return llvm.f16_to_f32(builder, load(builder.add(addr, i64(2 * LANES * v)), v16s, 2))

            # The accumulators live in allocas that LLVM promotes to registers (mem2reg).
            acc = [[cgutils.alloca_once(builder, v16f) for _ in range(VECS)] for _ in range(rows)]
            zero = ir.Constant(v16f, [0.0] * LANES)
            for row in acc:
                for a in row:
                    builder.store(zero, a)
            if zero_once:                                # one zero row: its 2**23 + z, loaded once
                zmv = [load(builder.add(zm_a, i64(4 * LANES * v)), v16f) for v in range(VECS)]
            with cgutils.for_range(builder, builder.sub(u_hi, u_lo)) as loop:
                u = builder.add(u_lo, loop.index)
                wu = builder.add(w_a, builder.mul(builder.mul(u, i64(unit_words)), w_stride))
                words = []
                for v in range(VECS):
                    per_v = []
                    for k in range(unit_words):
                        addr = builder.add(builder.add(wu, builder.mul(i64(k), w_stride)), i64(4 * LANES * v))
                        llvm.prefetch(builder, builder.add(addr, ahead_b))
                        per_v.append(load(addr, v16i))
                    words.append(per_v)
                xu = builder.add(xp_a, builder.mul(u, i64(4 * SLOTS * unit_codes)))
                for t in range(unit_codes):
                    k, off, straddles = places[t]
                    if inplace:
                        g = load(builder.add(gi_a, builder.mul(builder.add(builder.mul(u, i64(unit_codes)),
                                                                           i64(t)), i64(8))), i64, 8)
                        sc_g = builder.add(sc_a, builder.mul(g, sc_stride))
                        if not zero_once:
                            zm_g = builder.add(zm_a, builder.mul(g, zm_stride))
                    d = []
                    for v in range(VECS):
                        if straddles:
                            q = builder.call(fshr, [words[v][k + 1], words[v][k], vconst(off)])
                        else:
                            q = builder.lshr(words[v][k], vconst(off)) if off else words[v][k]
                        q = builder.or_(builder.and_(q, vconst((1 << bits) - 1)), vconst(MAGIC))
                        q = builder.bitcast(q, v16f)                                  # 2**23 + q
                        if inplace:
                            z = zmv[v] if zero_once else load(builder.add(zm_g, i64(4 * LANES * v)), v16f)
                            d.append(builder.fmul(builder.fsub(q, z), load(builder.add(sc_g, i64(4 * LANES * v)), v16f)))
                        else:
                            d.append(builder.fsub(q, zmv[v]))                         # q - z, exact
                    for r in range(rows):
                        xb = splat(load(builder.add(xu, i64(4 * (SLOTS * t + r))), f32))
                        for v in range(VECS):
                            builder.store(builder.call(fma, [xb, d[v], builder.load(acc[r][v])]), acc[r][v])
            for r in range(rows):
                for v in range(VECS):
                    addr = builder.inttoptr(builder.add(builder.add(y_a, builder.mul(i64(r), y_stride)),
                                                        i64(4 * LANES * v)), v16f.as_pointer())
                    old = builder.load(addr, align=4)
                    a = builder.load(acc[r][v])
                    if inplace:
                        new = builder.fadd(old, a)
                    else:
                        new = builder.call(fma, [a, half_row(sc_a, v), old])
                    builder.store(new, addr, align=4)
            return context.get_dummy_value()
        return types.void(*([types.intp] * 13)), codegen
    return tile


_seg_b4_r12, _seg_b4_r8, _seg_b4_r4 = (_tile(4, r, False) for r in TILE_ROWS)
_seg_b3_r12, _seg_b3_r8, _seg_b3_r4 = (_tile(3, r, False) for r in TILE_ROWS)
_inp_b4_r12, _inp_b4_r8, _inp_b4_r4 = (_tile(4, r, True) for r in TILE_ROWS)
_inp_b3_r12, _inp_b3_r8, _inp_b3_r4 = (_tile(3, r, True) for r in TILE_ROWS)
_sym_b4_r12, _sym_b4_r8, _sym_b4_r4 = (_tile(4, r, True, False) for r in TILE_ROWS)
_sym_b3_r12, _sym_b3_r8, _sym_b3_r4 = (_tile(3, r, True, False) for r in TILE_ROWS)


def row_tiles(n_rows):
    """Rows per tile for n_rows activation rows: tiles of 12, the rest in one tile of 8 or 4 or 12 (padded rows
    cost work, so a remainder of 4 or less turns the last 12 into two 8s: 64 rows = 4 x 12 + 2 x 8)."""
    n12, rest = divmod(n_rows, 12)
    if rest == 0:
        return [12] * n12
    if rest <= 4:
        return [12] * (n12 - 1) + [8, 8] if n12 else [4]
    return [12] * n12 + [8 if rest <= 8 else 12]


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def pack_x(x, gather, row_start, xpk):
    """xpk[t, k, r] = x[row_start[t] + r, gather[k]], zero past the tile's rows or where gather[k] is x.shape[1].

    x [N, in] float32, gather [K] int64 (the plan's row order, padding pointing one past the last input),
    row_start [T + 1] int64, xpk [T, K, SLOTS] float32. prange over (tile, 1024 inputs); one row of x at a
    time, so the gathered reads stay in one row (L1) and the writes run along the tile."""
    n_rows, n_in = x.shape
    n_tiles, n_k = xpk.shape[0], xpk.shape[1]
    step = 1024
    per_tile = (n_k + step - 1) // step
    for task in prange(n_tiles * per_tile):
        t = task // per_tile
        c = task - t * per_tile
        k0 = c * step
        k1 = min(n_k, k0 + step)
        r0 = row_start[t]
        rows = min(row_start[t + 1], n_rows) - r0
        for r in range(SLOTS):
            if r < rows:
                src = x[r0 + r]
                for k in range(k0, k1):
                    g = gather[k]
                    xpk[t, k, r] = src[g] if g < n_in else np.float32(0.0)
            else:
                for k in range(k0, k1):
                    xpk[t, k, r] = np.float32(0.0)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def _code(qw, i, j, bits):
    """Code of input row i (in the plan's row order), column j: bit i * bits of the column's stream of words."""
    pos = i * bits
    w = pos >> 5
    pair = np.int64(qw[w, j])
    if (pos & 31) + bits > 32:
        pair |= np.int64(qw[w + 1, j]) << 32
    return (pair >> (pos & 31)) & ((1 << bits) - 1)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def _fill_zeros(qzeros, bits, zero_add, const_zero, j0, width, zm):
    """zm[g, j] = 2**23 + true zero of group g, column j0 + j (zm [1, width] when every group shares it)."""
    magic = np.float32(2.0 ** 23)
    if const_zero >= 0:
        zm[0, :width] = magic + np.float32(const_zero)
        return
    mask = (1 << bits) - 1
    for g in range(zm.shape[0]):
        for j in range(width):
            zm[g, j] = magic + np.float32((_zero_code(qzeros[g], j0 + j, bits, qzeros.shape[1]) + zero_add) & mask)


@njit(inline="always")
def _start_slab(qw, qzeros, bits, zero_add, const_zero, j0, j1, zm, y):
    """What slab_segments does first, here and in avx2/tiles.py: y[:, j0:j1] cleared, zm filled (_fill_zeros),
    and the slab's byte strides for qw in either layout of generic/strips.py: (columns per strip W, packed rows
    R, bytes between packed rows, bytes between groups' scales, bytes between zm rows (0: one zero), bytes from
    a packed word to the one AHEAD_UNITS units later)."""
    n_out = y.shape[1]
    qw_width, n_packed = strips.shape_of(qw, n_out)
    _fill_zeros(qzeros, bits, zero_add, const_zero, j0, j1 - j0, zm)
    for n in range(y.shape[0]):
        y[n, j0:j1] = 0.0
    w_row = np.int64(4 * qw_width)
    zm_row = np.int64(zm.strides[0]) if const_zero < 0 else np.int64(0)
    return qw_width, n_packed, w_row, np.int64(2 * n_out), zm_row, np.int64(AHEAD_UNITS * unit_shape(bits)[0]) * w_row


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def _tile_segments(bits, rows, y, y_row, xp, w, w_row, u0, u1, sc, zm, ahead):
    """The segments tile of (bits, rows): one group's run of units (see _tile)."""
    if bits == 4:
        if rows == 12:
            _seg_b4_r12(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)
        elif rows == 8:
            _seg_b4_r8(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)
        else:
            _seg_b4_r4(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)
    else:
        if rows == 12:
            _seg_b3_r12(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)
        elif rows == 8:
            _seg_b3_r8(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)
        else:
            _seg_b3_r4(y, y_row, xp, w, w_row, u0, u1, sc, 0, zm, 0, 0, ahead)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def _tile_inplace(bits, rows, y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead):
    """The inplace tile of (bits, rows): a run of units whose inputs belong to any groups (see _tile);
    zm_row == 0 means one zero for every group."""
    if zm_row == 0:
        if bits == 4:
            if rows == 12:
                _sym_b4_r12(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
            elif rows == 8:
                _sym_b4_r8(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
            else:
                _sym_b4_r4(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
        else:
            if rows == 12:
                _sym_b3_r12(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
            elif rows == 8:
                _sym_b3_r8(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
            else:
                _sym_b3_r4(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, 0, gi, ahead)
    elif bits == 4:
        if rows == 12:
            _inp_b4_r12(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
        elif rows == 8:
            _inp_b4_r8(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
        else:
            _inp_b4_r4(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
    else:
        if rows == 12:
            _inp_b3_r12(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
        elif rows == 8:
            _inp_b3_r8(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)
        else:
            _inp_b3_r4(y, y_row, xp, w, w_row, u0, u1, sc, sc_row, zm, zm_row, gi, ahead)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def slab_segments(qw, xpk, row_start, runs, run_group, chunks, scales, qzeros, bits, zero_add, const_zero,
                  j0, j1, zm, y):
    """y[:, j0:j1] = x @ W[:, j0:j1] for a "segments" plan, on the calling thread (GIL released).

    qw [R, out] uint32; xpk [T, K, SLOTS] packed x (pack_x) in the plan's row order; row_start [T + 1]; runs
    [S + 1] first unit of each run of one group, run_group [S]; chunks [C + 1] first run of each chunk of about
    CHUNK_INPUTS inputs; scales [G, out] uint16 fp16 bits; qzeros [G, words]; zm scratch [G or 1, >= j1 - j0]
    float32; y [Np, out] float32 (rows past the last real one are padding). Columns past the last multiple of
    32 take the same arithmetic one at a time. qw may also be in column strips (generic/strips.py: [S * R, 32],
    whole strips, so never such last columns)."""
    full = (j1 - j0) // TILE_COLUMNS * TILE_COLUMNS
    qw_width, n_packed, w_row, sc_row, zm_row, ahead = _start_slab(qw, qzeros, bits, zero_add, const_zero, j0, j1,
                                                                   zm, y)
    y_row = np.int64(y.strides[0])
    x_tile = np.int64(xpk.strides[0])
    base_y, base_x = np.int64(y.ctypes.data), np.int64(xpk.ctypes.data)
    base_w, base_s, base_z = np.int64(qw.ctypes.data), np.int64(scales.ctypes.data), np.int64(zm.ctypes.data)
    for c in range(chunks.shape[0] - 1):
        for t in range(row_start.shape[0] - 1):
            rows = row_start[t + 1] - row_start[t]
            yt = base_y + row_start[t] * y_row + 4 * j0
            xt = base_x + t * x_tile
            for m in range(0, full, TILE_COLUMNS):
                for s in range(chunks[c], chunks[c + 1]):
                    g = run_group[s]
                    _tile_segments(bits, rows, yt + 4 * m, y_row, xt,
                                   base_w + strips.word_offset(qw_width, n_packed, 0, j0 + m), w_row, runs[s],
                                   runs[s + 1], base_s + g * sc_row + 2 * (j0 + m), base_z + g * zm_row + 4 * m,
                                   ahead)
    _tail_segments(qw, xpk, row_start, runs, run_group, scales, bits, const_zero, j0, j0 + full, j1, zm, y)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def _fill_tile_groups(scales, qzeros, bits, zero_add, const_zero, j0, width, sc, zm):
    """sc[m, g, l] = scale of group g, column j0 + 32 m + l, as float32 (one tile's groups together, in L1);
    zm[m, g, l] = 2**23 + its true zero, or zm[0, 0, :] = 2**23 + const_zero when every group shares it."""
    magic = np.float32(2.0 ** 23)
    mask = (1 << bits) - 1
    for g in range(scales.shape[0]):
        for j in range(width):
            sc[j // TILE_COLUMNS, g, j % TILE_COLUMNS] = f16_to_f32(scales[g, j0 + j])
            if const_zero < 0:
                z = (_zero_code(qzeros[g], j0 + j, bits, qzeros.shape[1]) + zero_add) & mask
                zm[j // TILE_COLUMNS, g, j % TILE_COLUMNS] = magic + np.float32(z)
    if const_zero >= 0:
        zm[0, 0, :] = magic + np.float32(const_zero)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def slab_inplace(qw, xpk, row_start, gi, n_units, scales, qzeros, bits, zero_add, const_zero, j0, j1, sc, zm, y):
    """y[:, j0:j1] = x @ W[:, j0:j1] for an "inplace" plan (qw in the checkpoint's row order, gi [K] the group of
    every input), on the calling thread. Scratch: sc [tiles, G, 32] float32 and zm [tiles, G, 32] (or
    [1, 1, 32] when every group shares the zero), filled by _fill_tile_groups: the per-input lookups of one
    tile of columns stay in L1 (with fp16 scales widened per input, or rows of the whole slab, this layout ran
    1.6x slower). Otherwise as slab_segments, with runs of FLUSH_CODES inputs in place of the groups."""
    unit_words, unit_codes = unit_shape(bits)
    width = j1 - j0
    full = width // TILE_COLUMNS * TILE_COLUMNS
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
            rows = row_start[t + 1] - row_start[t]
            yt = base_y + row_start[t] * y_row + 4 * j0
            xt = base_x + t * x_tile
            for m in range(0, full, TILE_COLUMNS):
                tile = m // TILE_COLUMNS
                for u0 in range(c0, c1, flush):
                    _tile_inplace(bits, rows, yt + 4 * m, y_row, xt, base_w + 4 * (j0 + m), w_row, u0,
                                  min(c1, u0 + flush), base_s + tile * sc_tile, sc_row, base_z + tile * zm_tile,
                                  zm_row, base_g, ahead)
    _tail_inplace(qw, xpk, row_start, gi, n_units, bits, const_zero, j0, full, width, sc, zm, y)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False, nogil=True)
def _tail_segments(qw, xpk, row_start, runs, run_group, scales, bits, const_zero, j0, j_lo, j1, zm, y):
    """slab_segments' columns j_lo..j1 (past the last whole tile of the slab j0..j1), one at a time with the
    tile's arithmetic: per run, acc = sum of fma(x, q - z), then y = fma(acc, s, y). zm as slab_segments fills
    it; shared by avx2/tiles.py, whose tiles are narrower but whose arithmetic is the same."""
    unit_codes = unit_shape(bits)[1]
    for j in range(j_lo, j1):
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
def _tail_inplace(qw, xpk, row_start, gi, n_units, bits, const_zero, j0, j_lo, j_hi, sc, zm, y):
    """slab_inplace's columns j0 + j_lo..j0 + j_hi (past the last whole tile of the slab), one at a time with the
    tile's arithmetic: per run of FLUSH_CODES inputs, acc = sum of fma(x, s[g_i] (q - z[g_i])), then y += acc.
    sc, zm as _fill_tile_groups fills them; shared by avx2/tiles.py, as _tail_segments."""
    unit_codes = unit_shape(bits)[1]
    flush = max(1, FLUSH_CODES // unit_codes)
    for j in range(j_lo, j_hi):
        m, lane = j // TILE_COLUMNS, j % TILE_COLUMNS
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


def supports(plan):
    """Whether a plan's layer can take the tiles: 3 or 4 bits, whole units of packed words for every input."""
    unit_words, unit_codes = unit_shape(plan.bits)
    return plan.bits in BITS and plan.n_packed >= plan.n_padded // unit_codes * unit_words


def split_runs(seg_start, seg_group, bits):
    """A "segments" plan's runs of one group, cut into pieces of at most FLUSH_CODES inputs (a layer with one
    group for all its inputs would otherwise sum thousands of products in one accumulator): runs [S + 1] first
    unit of each piece, run_group [S]."""
    unit = max(1, FLUSH_CODES // unit_shape(bits)[1])
    starts, groups = [], []
    for s in range(len(seg_group)):
        for u in range(int(seg_start[s]), int(seg_start[s + 1]), unit):
            starts.append(u)
            groups.append(int(seg_group[s]))
    starts.append(int(seg_start[-1]))
    return np.array(starts, dtype=np.int64), np.array(groups, dtype=np.int64)


def chunk_runs(runs, bits):
    """First run of each chunk of about CHUNK_INPUTS inputs (whole runs): [C + 1] int64."""
    unit_codes = unit_shape(bits)[1]
    chunks = [0]
    for s in range(1, len(runs) - 1):
        if (runs[s] - runs[chunks[-1]]) * unit_codes >= CHUNK_INPUTS:
            chunks.append(s)
    chunks.append(len(runs) - 1)
    return np.array(chunks, dtype=np.int64)


def slab_columns(n_out, n_rows, threads):
    """Output columns per slab: as wide as SLAB_MAX_COLUMNS allows, in a multiple of `threads` slabs of equal
    width (a multiple of 32), so no thread is left with a last slab alone. Every slab reads all of the packed
    x again (2.4 MB for 64 rows of 8192 inputs, from L3 or memory), so wide slabs matter: in a 70B pass,
    1024 columns instead of 256 took the streamed q and o projections from 3.5 to 3.1 s. Past 128 rows the
    slab's codes are reused by many tiles of rows and 512 columns measured as well or better (7B shapes, 512
    rows: 438-450 GFLOP/s against 400-420 at 1024, one run)."""
    threads = max(1, threads)
    widest = SLAB_MAX_COLUMNS if n_rows <= 128 else SLAB_MAX_COLUMNS // 2
    count = threads * -(-n_out // (threads * widest))        # slabs: a multiple of threads
    per_slab = -(-n_out // count)                                  # columns, rounded up
    return int(max(TILE_COLUMNS, -(-per_slab // TILE_COLUMNS) * TILE_COLUMNS))
