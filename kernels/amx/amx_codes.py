"""4-bit GPTQ codes straight into AMX tiles: exact prefill with no dequantized copy and three tile products.

kernels/amx/amx.py multiplies a dequantized slab, w = s (q - z) split into two bfloat16s. For 4-bit "segments"
plans (every layer that is resident, act-order ones after their repack) there is a cheaper route, the same
group-sum factorisation as the decode GEMV (gptq_gemv.py):

    sum_i x_i s (q_i - z) = s (sum_i x_i q_i  -  z sum_i x)        over the inputs i of one segment (group)

A code q is 0..15, exactly a bfloat16, so the tiles need only x's three parts (x_hi + x_mid + x_lo = x,
amx.py): three tile products per 32 inputs instead of five, each exact in float32. Scale and zero are applied
once per segment and column when the accumulator tiles are folded into y.

Codes to tile rows without arithmetic: tdpbf16ps wants, per 32-bit lane (column), a pair of bfloat16s.
A packed word holds the codes of inputs 0..7 of its column, input k in bits 4k..4k+3. vpermw looks a table
up by the low 5 bits of each 16-bit half of a lane, so on the raw word it reads code 0 (bits 0..3, plus bit 4
which the 32-entry table ignores by repeating itself) in the low half and code 4 (bits 16..19) in the high
half: the pair (q0, q4). The word shifted right by 4, 8 and 12 gives (q1, q5), (q2, q6), (q3, q7). So four
packed rows (32 inputs) become the 16 rows of a tile with three shifts and four table lookups per word, and
x's columns are put in the same order once per call: pair r of a 32-input block holds inputs
8 (r // 4) + r % 4 and that + 4.

A few rows (a decode batch): a tile has 16 rows, so 8 rows of x fill half of each of the three part tiles.
Instead, stack_parts puts the parts as rows of their own (row p N + r holds part p of row r) and one product
per step gives all three; the fold adds the three rows of each C row. The sums are the same three float32
sums, added at the end instead of along the way: the same error bound. For 8 rows, on 8192 x 28672: 36 ms
with three products per step, 20 with one (of which 16 are the code conversion and the folds).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .amx import _bits, _c_end, _call, _configure, _hi_rest, _ptr, _release, COLS, ROWS
from ..generic.gptq_gemv import _unpack_zero_row
from ..generic.half import f16_to_f32
from ..generic import strips
from .. import llvm

SLAB = 512            # columns per thread task (its accumulator blocks share each row block's x tiles). Wider
                      # than 128 since 3-row stacking: 70B shapes, 2 threads, 0.8-0.95x the time at 8 and 512
                      # rows (tied at 64); streamed down_proj, 8 rows, cold: 58 against 67-96 ms
STACKED_ROWS = 32     # up to STACKED_ROWS // 3 rows of x, its three parts go in as rows of one tile pair


def aligned(n_bytes, align=64):
    """A uint8 scratch array of n_bytes whose first byte is `align`-aligned (for the code tiles)."""
    return strips.zeros_aligned((n_bytes,), np.uint8, align)

# The bfloat16 of 0..15, twice: vpermw indexes 32 entries with 5 bits and bit 4 belongs to the next code.
_TABLE = np.tile((np.arange(16, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16), 2)
TABLE = np.ascontiguousarray(_TABLE)

_I8, _I16, _I32, _I64, _VOID = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.VoidType()
_I8P = _I8.as_pointer()


def _products(builder, parts, a, a_part, a_row16, b0, b1, b_stride):
    """Emit C[r, c] += A[r] . codes[c] for the 2 x 2 accumulator tiles 0..3: code tiles 6, 7 from b0, b1 (rows
    b_stride apart), x's row tiles 4, 5 from a and a + a_row16. parts 3: A = x_hi + x_mid + x_lo, each part's
    tiles a_part bytes apart (12 tdpbf16ps); parts 1: A is one set of rows, x's parts stacked as rows of their
    own (STACKED_ROWS, 4 tdpbf16ps)."""
    load_types, dot_types = [_I8, _I8P, _I64], [_I8, _I8, _I8]
    for c, b in enumerate((b0, b1)):
        _call(builder, "llvm.x86.tileloadd64", [_I8(6 + c), _ptr(builder, b), b_stride], load_types)
    for part in range(parts):
        base = builder.add(a, builder.mul(a_part, _I64(part)))
        _call(builder, "llvm.x86.tileloadd64", [_I8(4), _ptr(builder, base), _I64(64)], load_types)
        _call(builder, "llvm.x86.tileloadd64", [_I8(5), _ptr(builder, builder.add(base, a_row16)), _I64(64)],
              load_types)
        for t in range(4):
            _call(builder, "llvm.x86.tdpbf16ps", [_I8(t), _I8(4 + t // 2), _I8(6 + t % 2)], dot_types)


def _codes_step_for(parts):
    """The intrinsic for one step of 32 inputs of a 32 x 32 block: the 4 packed rows of 32 columns (qw_addr,
    rows qw_row_bytes apart) become two code tiles in buf (2 KB), then C[r, c] += A[r] . codes[c] (_products:
    parts 3, x's tiles as in amx._k_step, row tile 1 a_row16 bytes on, parts a_part bytes apart; or 1)."""
    @intrinsic
    def codes_step(typingctx, qw_addr, qw_row_bytes, table_addr, buf_addr, a_addr, a_part, a_row16):
        def codegen(context, builder, sig, args):
            q, q_stride, tab, buf, a, ap, ar16 = args
            v16i = ir.VectorType(_I32, 16)
            v32s = ir.VectorType(_I16, 32)
            table = builder.load(builder.inttoptr(tab, v32s.as_pointer()), align=2)
            for c in range(2):                                    # the two column tiles
                for i in range(4):                                # packed rows: inputs 8i..8i+7
                    addr = builder.add(builder.add(q, builder.mul(q_stride, _I64(i))), _I64(64 * c))
                    word = builder.load(builder.inttoptr(addr, v16i.as_pointer()), align=4)
                    for s in range(4):                            # pair (8i + s, 8i + 4 + s) -> tile row 4i + s
                        shifted = builder.lshr(word, ir.Constant(v16i, [4 * s] * 16)) if s else word
                        pair = _call(builder, "llvm.x86.avx512.permvar.hi.512",
                                     [table, builder.bitcast(shifted, v32s)], [v32s, v32s], ret=v32s)
                        out = builder.add(buf, _I64(1024 * c + 64 * (4 * i + s)))
                        builder.store(pair, builder.inttoptr(out, v32s.as_pointer()), align=64)
            _products(builder, parts, a, ap, ar16, buf, builder.add(buf, _I64(1024)), _I64(64))
            return context.get_dummy_value()
        return types.void(*([types.intp] * 7)), codegen
    return codes_step


_codes_step = _codes_step_for(3)
_codes_step1 = _codes_step_for(1)


@intrinsic
def _c_zero(typingctx):
    def codegen(context, builder, sig, args):
        for t in range(4):
            _call(builder, "llvm.x86.tilezero", [_I8(t)], [_I8])
        return context.get_dummy_value()
    return types.void(), codegen


@njit(parallel=True, cache=True, boundscheck=False, error_model="numpy")
def split_x_paired(x, seg_start, xs, sumx):
    """x [N, K] (plan order, K a multiple of 32) -> xs [3, Np / 16, K / 32, 16, 32] uint16, x's three bfloat16
    parts with each 32-input block's columns in the tiles' pair order (module docstring), and sumx [N, S]
    float32, the sum of x over each segment's inputs (segments in units of 8 inputs)."""
    n_seg = seg_start.shape[0] - 1
    for r in prange(x.shape[0]):
        rt, rr = r >> 4, r & 15
        for kt in range(x.shape[1] >> 5):
            for pos in range(32):
                pair = pos >> 1
                k = (kt << 5) + 8 * (pair >> 2) + (pair & 3) + 4 * (pos & 1)
                h, rest = _hi_rest(x[r, k])
                m, low = _hi_rest(rest)
                xs[0, rt, kt, rr, pos] = np.uint16(h >> np.uint32(16))
                xs[1, rt, kt, rr, pos] = np.uint16(m >> np.uint32(16))
                xs[2, rt, kt, rr, pos] = np.uint16(_bits(low) >> np.uint32(16))
        for s in range(n_seg):
            total = np.float32(0.0)
            for k in range(seg_start[s] * 8, seg_start[s + 1] * 8):
                total += x[r, k]
            sumx[r, s] = total


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _widen_group(scales, qzeros, g, j0, cols, zero_add, const_zero, scale, zero):
    """scale[j], zero[j] = group g's float32 scale and true zero of column j0 + j, for j < cols."""
    for j in range(cols):
        scale[j] = f16_to_f32(scales[g, j0 + j])
    if const_zero >= 0:
        zero[:cols] = np.float32(const_zero)
    else:
        _unpack_zero_row(qzeros[g], j0, cols, 4, zero_add, zero)


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _fold(cbuf, acc, acc_row, c0, scale, zero, sumx, s, x_row, n_rows):
    """acc[acc_row + r, c0 + j] += scale (C[r, j] - zero sumx[x_row + r, s]) for one 32 x 32 block C = cbuf
    of segment s (rows of x past n_rows are padding: any finite sum will do, they are never stored)."""
    for r in range(ROWS):
        sx = sumx[min(x_row + r, n_rows - 1), s]
        row, out = cbuf[r], acc[acc_row + r, c0:c0 + COLS]
        sc, zc = scale[c0:c0 + COLS], zero[c0:c0 + COLS]
        for j in range(COLS):
            out[j] += sc[j] * (row[j] - zc[j] * sx)


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _fold_stacked(cbuf, acc, c0, scale, zero, sumx, s, n_rows):
    """_fold for stacked parts (stack_parts): row r of x is C rows r, n_rows + r and 2 n_rows + r (its hi, mid
    and lo products), so acc[r, c0 + j] += scale (C[r] + C[n_rows + r] + C[2 n_rows + r] - zero sumx[r, s])."""
    for r in range(n_rows):
        sx = sumx[r, s]
        hi, mid, lo = cbuf[r], cbuf[n_rows + r], cbuf[2 * n_rows + r]
        out = acc[r, c0:c0 + COLS]
        sc, zc = scale[c0:c0 + COLS], zero[c0:c0 + COLS]
        for j in range(COLS):
            out[j] += sc[j] * ((hi[j] + mid[j] + lo[j]) - zc[j] * sx)


def stack_parts(xs, n_rows):
    """x's three parts as rows of one tile pair, for a few rows (3 n_rows <= STACKED_ROWS): xs [3, T, K / 32,
    16, 32] (split_x_paired or amx.split_rows) -> [1, 2, K / 32, 16, 32] whose row p n_rows + r is part p of x's
    row r, zeros below. One tile product per step instead of three (the tiles have 16 rows each, and a decode
    batch of 8 would leave most of them empty)."""
    parts, n_tiles, n_k = xs.shape[:3]
    rows = xs.transpose(0, 1, 3, 2, 4).reshape(parts, n_tiles * 16, n_k, 32)[:, :n_rows]   # [3, N, K/32, 32]
    stacked = np.zeros((STACKED_ROWS, n_k, 32), dtype=np.uint16)                          # [32, K/32, 32]
    stacked[:parts * n_rows] = rows.reshape(parts * n_rows, n_k, 32)
    return np.ascontiguousarray(stacked.reshape(2, 16, n_k, 32).transpose(0, 2, 1, 3))[None]


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def product_codes(cfg, table, xs, sumx, n_rows, qw, seg_start, seg_group, scales, qzeros, zero_add, const_zero,
                  j0, j1, codes, cbuf, acc, sz, y, stacked=False):
    """y[:n_rows, j0:j1] = x @ W[:, j0:j1] for a 4-bit "segments" plan whose segments hold whole blocks of 32
    inputs. Per 32-row block and segment: for each 32-column block, zero the accumulators, run the segment's
    steps, store them to cbuf [32, 32] and fold: acc[r, j] += s_j (C[r, j] - z_j sumx[r, segment]); after the
    last segment acc is y. codes (2 KB, 64-byte aligned: two code tiles), cbuf [32, 32], acc [32, SLAB] and
    sz [2, SLAB] are the caller's per-thread scratch. stacked: xs is stack_parts' (a few rows, one product
    per step)."""
    _configure(cfg.ctypes.data)
    n_row_tiles, n_k_tiles = xs.shape[1], xs.shape[2]
    a_part = n_row_tiles * n_k_tiles * 1024
    q_row_bytes = qw.shape[1] * 4
    cols = j1 - j0
    base = codes.ctypes.data
    scale, zero = sz[0], sz[1]
    for rt in range(0, n_row_tiles, 2):
        r0 = rt * 16
        acc[:, :cols] = 0.0
        for s in range(seg_group.shape[0]):
            _widen_group(scales, qzeros, seg_group[s], j0, cols, zero_add, const_zero, scale, zero)
            for c0 in range(0, cols, COLS):
                _c_zero()
                for u in range(seg_start[s], seg_start[s + 1], 4):       # 4 packed rows = 32 inputs
                    a = xs.ctypes.data + (rt * n_k_tiles + (u >> 2)) * 1024
                    q = qw.ctypes.data + u * q_row_bytes + (j0 + c0) * 4
                    if stacked:
                        _codes_step1(q, q_row_bytes, table.ctypes.data, base, a, a_part, n_k_tiles * 1024)
                    else:
                        _codes_step(q, q_row_bytes, table.ctypes.data, base, a, a_part, n_k_tiles * 1024)
                _c_end(cbuf.ctypes.data, 128)
                if stacked:
                    _fold_stacked(cbuf, acc, c0, scale, zero, sumx, s, n_rows)
                else:
                    _fold(cbuf, acc, 0, c0, scale, zero, sumx, s, r0, n_rows)
        for r in range(min(ROWS, n_rows - r0)):
            y[r0 + r, j0:j1] = acc[r, :cols]
    _release()


def gathers(bits, n_out):
    """Whether product_gathered serves a layer of this shape: 4-bit codes, whole 32-column blocks."""
    return bits == 4 and n_out % COLS == 0


def supports(plan):
    """A 4-bit "segments" plan whose segments hold whole blocks of 32 inputs (4 packed rows), and whose
    columns come in whole 32-column blocks."""
    return (plan.layout == "segments" and plan.bits == 4 and plan.n_out % COLS == 0
            and plan.whole_blocks)



# -- streamed act-order layers: the codes gathered into group order ------------------------------------------

@intrinsic
def _pair_row(typingctx, a_addr, b_addr, shift_a, shift_b, mask_a, mask_b, table_addr, out_addr, n16):
    """out[j] = bfloat16 pair (code a, code b) of columns j < 16 n16: code a = (word_a[j] >> shift_a) & mask_a,
    from the packed row at a_addr, code b likewise; both looked up in TABLE at once (vpermw reads the low
    half's index from bits 0..4 and the high half's from bits 16..20 of each lane). 16 columns per step.
    Rotations put code a at bit 0 and code b at bit 16 directly, and the two masks and the OR become one
    vpternlogd: five vector operations per 16 pairs."""
    def codegen(context, builder, sig, args):
        a, b, sa, sb, ma, mb, tab, out, n = args
        v16i = ir.VectorType(_I32, 16)
        v32s = ir.VectorType(_I16, 32)

        def splat(value):
            return llvm.splat(builder, builder.trunc(value, _I32), v16i)
        rotr = llvm.declare(builder.module, "llvm.fshr.v16i32", v16i, [v16i] * 3)
        rotl = llvm.declare(builder.module, "llvm.fshl.v16i32", v16i, [v16i] * 3)
        table = builder.load(builder.inttoptr(tab, v32s.as_pointer()), align=2)
        sa_v = splat(sa)                                                   # code a: bits sa.. -> 0..
        sb_v = splat(builder.and_(builder.sub(_I64(16), sb), _I64(31)))   # code b: bits sb.. -> 16..
        ma_v, mb_v = splat(ma), splat(builder.shl(mb, _I64(16)))
        with cgutils.for_range(builder, n) as loop:
            offset = builder.mul(loop.index, _I64(64))
            wa = builder.load(builder.inttoptr(builder.add(a, offset), v16i.as_pointer()), align=4)
            wb = builder.load(builder.inttoptr(builder.add(b, offset), v16i.as_pointer()), align=4)
            qa = builder.and_(builder.call(rotr, [wa, wa, sa_v]), ma_v)
            qb = builder.and_(builder.call(rotl, [wb, wb, sb_v]), mb_v)
            pair = _call(builder, "llvm.x86.avx512.permvar.hi.512", [table, builder.bitcast(builder.or_(qa, qb), v32s)],
                         [v32s, v32s], ret=v32s)
            builder.store(pair, builder.inttoptr(builder.add(out, offset), v32s.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.void(*([types.intp] * 9)), codegen


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _gather_tiles(qw, src, t0, t1, j0, cols, table, btiles):
    """Code tiles for sorted inputs t0..t1 (whole steps of 32) and columns j0..j0 + cols (a multiple of 16) of
    a 4-bit "inplace" layer: btiles[step, pair, j] = the bfloat16 codes of inputs src[t], src[t + 1] (the
    checkpoint's rows; -1 for padding, which gets code 0) in column j0 + j, low half first. The tile of
    columns 16c.. of a step is then 16 rows of 64 bytes, btiles.shape[2] * 4 bytes apart. The words are read
    where they lie: code i sits at bit 4 (i % 8) of packed row i // 8."""
    row_bytes = qw.shape[1] * 4
    for t in range(t0, t1, 2):
        step, pair = (t - t0) >> 5, ((t - t0) & 31) >> 1
        ia, ib = src[t], src[t + 1]
        ra = qw.ctypes.data + (max(ia, 0) >> 3) * row_bytes + j0 * 4
        rb = qw.ctypes.data + (max(ib, 0) >> 3) * row_bytes + j0 * 4
        out = btiles.ctypes.data + (step * 16 + pair) * btiles.shape[2] * 4
        _pair_row(ra, rb, 4 * (max(ia, 0) & 7), 4 * (max(ib, 0) & 7), 15 if ia >= 0 else 0, 15 if ib >= 0 else 0,
                  table.ctypes.data, out, cols >> 4)


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def product_gathered(cfg, table, xs, sumx, n_rows, qw, src, seg_start, seg_group, scales, qzeros, zero_add,
                     const_zero, j0, j1, btiles, cbuf, acc, sz, y, stacked=False):
    """y[:n_rows, j0:j1] = x @ W[:, j0:j1] for a 4-bit "inplace" plan (act-order, streamed): inputs taken in
    group order (src: original input of each sorted position, segments of whole 32-input steps in seg_start),
    x split in that order (amx.split_rows). Per segment: gather the codes of all the slab's columns into
    btiles once (_gather_tiles), then for every 32-row and 32-column block run the segment's steps (three
    tile products each, as product_codes; one with stacked parts) and fold s (C - z sumx) into acc [Np, SLAB];
    acc is y at the end."""
    _configure(cfg.ctypes.data)
    n_row_tiles, n_k_tiles = xs.shape[1], xs.shape[2]
    a_part = n_row_tiles * n_k_tiles * 1024
    cols = j1 - j0
    scale, zero = sz[0], sz[1]
    acc[:, :cols] = 0.0
    for s in range(seg_group.shape[0]):
        k0, k1 = seg_start[s], seg_start[s + 1]              # in steps of 32 sorted inputs
        _gather_tiles(qw, src, k0 * 32, k1 * 32, j0, cols, table, btiles)
        _widen_group(scales, qzeros, seg_group[s], j0, cols, zero_add, const_zero, scale, zero)
        for rt in range(0, n_row_tiles, 2):
            for c0 in range(0, cols, COLS):
                _c_zero()
                for kt in range(k0, k1):
                    a = xs.ctypes.data + (rt * n_k_tiles + kt) * 1024
                    b = btiles.ctypes.data + ((kt - k0) * 16 * btiles.shape[2] + c0) * 4
                    if stacked:
                        _k_step1(a, a_part, n_k_tiles * 1024, b, btiles.shape[2] * 4)
                    else:
                        _k_step3(a, a_part, n_k_tiles * 1024, b, btiles.shape[2] * 4)
                _c_end(cbuf.ctypes.data, 128)
                if stacked:
                    _fold_stacked(cbuf, acc, c0, scale, zero, sumx, s, n_rows)
                else:
                    _fold(cbuf, acc, rt * 16, c0, scale, zero, sumx, s, rt * 16, n_rows)
    for r in range(n_rows):
        y[r, j0:j1] = acc[r, :cols]
    _release()


def _k_step_for(parts):
    """C[r, c] += A[r] . codes[c] from ready code tiles (b_addr and b_addr + 64, rows b_stride apart): the
    products of _codes_step_for(parts) without the conversion."""
    @intrinsic
    def k_step(typingctx, a_addr, a_part, a_row16, b_addr, b_stride):
        def codegen(context, builder, sig, args):
            a, ap, ar16, b, bs = args
            _products(builder, parts, a, ap, ar16, b, builder.add(b, _I64(64)), bs)
            return context.get_dummy_value()
        return types.void(*([types.intp] * 5)), codegen
    return k_step


_k_step3 = _k_step_for(3)
_k_step1 = _k_step_for(1)


def group_order(g_idx, n_in, n_groups):
    """For an "inplace" plan: (src [Kp] int64, seg_start [S + 1] in steps of 32, seg_group [S]): the inputs
    sorted by group (stably), each group padded to whole steps of 32 with -1. Made per call: O(inputs)."""
    g = np.asarray(g_idx[:n_in], dtype=np.int64)
    order = np.argsort(g, kind="stable")                                     # [in]
    counts = np.bincount(g, minlength=n_groups)                              # [G]
    steps = -(-counts // 32)                                                 # [G]
    keep = steps > 0
    starts = np.concatenate([[0], np.cumsum(steps[keep])]).astype(np.int64)  # [S + 1]
    src = np.full(int(starts[-1]) * 32, -1, dtype=np.int64)                   # [Kp]
    taken = 0
    for s, grp in enumerate(np.flatnonzero(keep)):
        c = int(counts[grp])
        src[starts[s] * 32:starts[s] * 32 + c] = order[taken:taken + c]
        taken += c
    return src, starts, np.flatnonzero(keep).astype(np.int64)
