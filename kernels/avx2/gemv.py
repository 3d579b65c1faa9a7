"""Exact decode on AVX2: the float GEMV with each code decoded once for all rows, by one AND and one conversion.

The float GEMV (generic/gptq_gemv.py) forms acc_j += x_i * q_ij per row, shifting every code down to 0..15
first. Here the shift goes: for a packed word w holding the codes of inputs 8u .. 8u + 7 of one column,

    w & (15 << 4t) = q_t * 16^t          (t = 0 .. 6: below 2^28, a non-negative int32, exact in float32)

so one vpand and one vcvtdq2ps give the code times a power of two, and the activations are scaled once per
call by the inverse: xs_i = x_i * 16^-(i mod 8). The top code (t = 7) would read as a negative int32, so it
is shifted down (vpsrld 28) and its x is left as it is. A power-of-two scaling changes no rounding, so every
product (q * 16^t) * (x * 16^-t) is the float32 product q * x (for |x| >= 2^-102: smaller activations lose
bits of x * 16^-t, an absolute error below 2^-120).

Per segment of packed rows of one group g (kernels/gptq.py's "segments" layout, row-major or in column strips:
generic/strips.py) and strip of 8 C columns,
every row n of a chunk of R rows keeps C vectors of 8 float32 accumulators in registers over the whole
segment (an LLVM loop with the accumulators in phi nodes), then folds them into y once:

    acc_nj = sum_i xs_ni * (code_ij * 16^t)        y_nj += s_gj * (acc_nj - z_gj * sum_i x_ni)

Per 8 weights the decode is 2 instructions shared by the R rows of the chunk, and each row adds one FMA and
1/C of a broadcast of its x: one row costs 3 instructions per 8 weights, 8 rows 1.25 a row.

Register budget (16 ymm): R x C accumulators + C packed words + one decoded vector + one broadcast x.
One row: C = 4 (32 columns: 4 + 4 + 2 = 10). More rows: chunks of up to 4 rows and C = 2 (16 columns:
8 + 2 + 2 = 12), the chunks of one strip one after the other while its packed words (16 rows x 64 bytes
for a 128-input group) stay in L1.

One row, where the CPU multiplies subnormal floats at full speed (cpu.fast_subnormals: AMD Zen), takes 64
columns a call without the conversion: a float32 whose bit pattern is an integer n below 2^24 (exponent field
0 or 1) is the number n * 2^-149, so a masked code read as a float is q * 2^(b - 149), exact, and one vpand
and one FMA per 8 weights remain (the conversion unit was the limit: one a cycle). Codes 0-5 are masked in
place (b = 4t), code 6 after a shift by 4 (b = 20), code 7 by a shift of 28 (b = 0), and the activations are
scaled to match:

    xsub_i = x_i * 2^(S - b(i mod 8))      (x_i * 2^S below 2^125, S from the row's largest |x|)
    acc_j  = sum_i xsub_i * (q_ij * 2^(b - 149)) = 2^(S - 149) * sum_i x_i * q_ij

Every product and partial sum is the cvt kernel's times the power of two 2^(S - 149), so the sums have its
bits, and acc * 2^(149 - S) before the fold gives its result exactly (while they stay above 2^-126 after
scaling: partial sums below about 2^-102 of the row's largest |x| may differ; and |x| must stay below 2^100).
Eight chains of FMAs (64 columns: a strip of 64, or two of 32) hide their latency. Of the 8 packed words of a
row, KEPT_WORDS stay in registers for its 8 codes and the others are read again from L1 for each code: 16
registers hold 8 accumulators, 4 words, a mask, a broadcast x and a temporary. Loads were the limit: reading
all 8 again for each code (73 loads a packed row) ran 5-12% slower in L2 and L3 on one thread (Zen 4, capped
to AVX2), and keeping all 8 spills them to the stack.
A thread whose MXCSR has DAZ set (something in the process asked for flush-to-zero) would read the codes as
zero, so each task clears DAZ for its duration and restores the register after.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import llvm
from ..cpu import fast_subnormals
from ..generic.block_decode import zeros8_ir
from ..generic.gptq_gemv import _zero_code
from ..generic.gptq_inplace import fma_f32
from ..generic import strips, tasks
from ..generic.half import f16_to_f32
from ..llvm import F32, I16, I32, I64, vec

LANES = 8                     # float32 lanes of a ymm register
PREFETCH_BYTES = 512          # each packed row of the segment is asked for this far ahead of the strip: 32
                              # rows in flight (16 per thread) are more than the hardware prefetchers follow
                              # when memory is contended (7B layer, 1 row, capped AVX2 on a busy host: 11.6 ->
                              # 6.4-7.6 ms; no change when the host is quiet)
V8F, V8I = vec(F32, LANES), vec(I32, LANES)
X_SCALE = np.array([16.0 ** -t for t in range(7)] + [1.0], dtype=np.float32)   # xs_i = x_i * X_SCALE[i % 8]
SUB_SHIFT = np.array([0, 4, 8, 12, 16, 20, 20, 0], dtype=np.int64)   # code t as the integer q * 2^SUB_SHIFT[t]
SUB_MASKS = np.array([[15 << b] * LANES for b in range(0, 24, 4)], dtype=np.int32)   # [6, 8]: the masks, row b/4
KEPT_WORDS = 4                # of a packed row's 8 words, kept in registers by the subnormal-code kernel
DAZ = 0x40                    # MXCSR's denormals-are-zero bit


def _strip(rows, vecs):
    """The kernel for one segment, one strip of 8 * vecs columns and `rows` activation rows (compile-time)."""
    @intrinsic
    def strip(typingctx, y_a, y_st, w_a, w_st, ahead, n_packed, x_a, x_st, sx_a, sx_st, sc_a, z_a, zero_add,
              const_zero):
        """y_a: row 0's y at the strip's first column (the next rows y_st bytes further); w_a: the segment's
        first packed word of the strip (the next packed rows w_st further; each is asked for `ahead` bytes
        before it is read), n_packed packed rows; x_a: row 0's
        scaled x at the segment's first input (x_st between rows); sx_a: row 0's sum of x over the segment
        (sx_st between rows); sc_a: the group's fp16 scales of the strip; z_a: its first qzeros word;
        zero_add 1 for AutoGPTQ's stored zero - 1; const_zero >= 0: every zero is that, qzeros unread."""
        def codegen(context, builder, signature, args):
            y_a, y_st, w_a, w_st, ahead, n_packed, x_a, x_st, sx_a, sx_st, sc_a, z_a, zero_add, const_zero = args

            def packed_row(i, flat):                                            # flat: [rows * vecs]
                acc = [flat[r * vecs:(r + 1) * vecs] for r in range(rows)]
                w_row = builder.add(w_a, builder.mul(i, w_st))
                for line in range(0, 32 * vecs, 64):
                    llvm.prefetch(builder, llvm.offset(builder, builder.add(w_row, ahead), line))
                words = [llvm.load(builder, llvm.offset(builder, w_row, 32 * c), V8I) for c in range(vecs)]
                x_row = [builder.add(builder.add(x_a, builder.mul(I64(r), x_st)), builder.mul(i, I64(32)))
                         for r in range(rows)]
                for t in range(8):
                    xb = [llvm.splat(builder, llvm.load(builder, llvm.offset(builder, x_row[r], 4 * t), F32), V8F)
                          for r in range(rows)]
                    for c in range(vecs):
                        if t < 7:
                            code = builder.and_(words[c], ir.Constant(V8I, [15 << (4 * t)] * LANES))
                        else:
                            code = builder.lshr(words[c], ir.Constant(V8I, [28] * LANES))
                        f = builder.sitofp(code, V8F)                               # q * 16^t, exact
                        for r in range(rows):
                            acc[r][c] = llvm.call(builder, "llvm.fma.v8f32", [f, xb[r], acc[r][c]], V8F)
                return [a for row in acc for a in row]

            flat = llvm.sum_loop(builder, n_packed, rows * vecs, V8F, packed_row, "packed_rows")
            done = [flat[r * vecs:(r + 1) * vecs] for r in range(rows)]
            use_const = builder.fcmp_ordered(">=", const_zero, ir.Constant(F32, 0.0))
            for c in range(vecs):
                s = llvm.f16_to_f32(builder, llvm.load(builder, llvm.offset(builder, sc_a, 16 * c), vec(I16, LANES)))
                unpacked = zeros8_ir(builder, z_a, c, zero_add)
                z = builder.select(use_const, llvm.splat(builder, const_zero, V8F), unpacked)
                for r in range(rows):
                    sx = llvm.splat(builder, llvm.load(builder, builder.add(sx_a, builder.mul(I64(r), sx_st)), F32),
                                    V8F)
                    d = builder.fsub(done[r][c], builder.fmul(z, sx))
                    y_addr = builder.add(builder.add(y_a, builder.mul(I64(r), y_st)), I64(32 * c))
                    llvm.store(builder, builder.fadd(llvm.load(builder, y_addr, V8F), builder.fmul(s, d)), y_addr)
            return context.get_dummy_value()
        sig = types.void(*([types.intp] * 13), types.float32)
        return sig, codegen
    return strip


_one_row = _strip(1, 4)
_rows1, _rows2, _rows3, _rows4 = (_strip(r, 2) for r in range(1, 5))


@intrinsic
def _pair_subnormal(typingctx, y_a, w_a, w_hi, w_st, seg_a, group_a, n_seg, x_a, m_a, sx_a, sc_a, sc_st, z_a, z_st,
                    zero_add, const_zero, unscale):
    """One row, 64 columns, every segment: 32 columns at w_a and 32 at w_a + w_hi (the next strip, or the next
    32 words of a row-major layout), the codes fed to the FMAs as subnormal floats (module docstring). w_a:
    packed row 0 of the columns (packed row u is u * w_st further); seg_a, group_a: the plan's seg_start
    (n_seg + 1 int64) and seg_group (n_seg int64); x_a: the row's xsub; m_a: SUB_MASKS; sx_a: the row's sums
    of x per segment; sc_a, z_a: the columns' scales and qzeros in group 0 (group g sc_st, z_st bytes further);
    unscale: 2^(149 - S). Per segment _strip's fold, on acc * unscale; the next segment's scales and zeros are
    asked for first."""
    def codegen(context, builder, signature, args):
        (y_a, w_a, w_hi, w_st, seg_a, group_a, n_seg, x_a, m_a, sx_a, sc_a, sc_st, z_a, z_st, zero_add, const_zero,
         unscale) = args
        barrier = ir.FunctionType(ir.VoidType(), [])
        use_const = builder.fcmp_ordered(">=", const_zero, ir.Constant(F32, 0.0))
        back = llvm.splat(builder, unscale, V8F)

        def segment(s, _):
            u0 = llvm.load(builder, builder.add(seg_a, builder.mul(s, I64(8))), I64)
            u1 = llvm.load(builder, builder.add(seg_a, builder.mul(builder.add(s, I64(1)), I64(8))), I64)
            g = llvm.load(builder, builder.add(group_a, builder.mul(s, I64(8))), I64)
            last = builder.icmp_signed(">=", builder.add(s, I64(1)), n_seg)
            g_next = llvm.load(builder, builder.add(group_a, builder.mul(
                builder.select(last, s, builder.add(s, I64(1))), I64(8))), I64)
            sc_next = builder.add(sc_a, builder.mul(g_next, sc_st))
            for line in (sc_next, llvm.offset(builder, sc_next, 64), builder.add(z_a, builder.mul(g_next, z_st))):
                llvm.prefetch(builder, line)
            w_seg = builder.add(w_a, builder.mul(u0, w_st))
            x_seg = builder.add(x_a, builder.mul(u0, I64(32)))

            def packed_row(i, acc):                                         # acc: [8] vectors of 8 columns
                acc = list(acc)
                w_row = builder.add(w_seg, builder.mul(i, w_st))
                addr = [llvm.offset(builder, w_row if c < 4 else builder.add(w_row, w_hi), 32 * (c % 4))
                        for c in range(8)]
                x_row = builder.add(x_seg, builder.mul(i, I64(32)))
                kept = [llvm.load(builder, addr[c], V8I) for c in range(KEPT_WORDS)]   # in registers
                for t in range(8):
                    xb = llvm.splat(builder, llvm.load(builder, llvm.offset(builder, x_row, 4 * t), F32), V8F)
                    if t < 7:
                        mask = llvm.load(builder, llvm.offset(builder, m_a, 8 * int(SUB_SHIFT[t])), V8I)
                    for c in range(8):
                        word = kept[c] if c < KEPT_WORDS else llvm.load(builder, addr[c], V8I)   # else from L1
                        if t < 6:
                            code = builder.and_(word, mask)                 # q * 2^(4t)
                        elif t == 6:
                            code = builder.and_(builder.lshr(word, ir.Constant(V8I, [4] * LANES)), mask)
                        else:
                            code = builder.lshr(word, ir.Constant(V8I, [28] * LANES))
                        f = builder.bitcast(code, V8F)                      # q * 2^(b - 149), subnormal
                        acc[c] = llvm.call(builder, "llvm.fma.v8f32", [f, xb, acc[c]], V8F)
                    if t < 7:                                               # the next code reads memory again
                        builder.asm(barrier, "", "~{memory}", [], True)
                return acc

            done = llvm.sum_loop(builder, builder.sub(u1, u0), 8, V8F, packed_row, "packed_rows")
            sx8 = llvm.splat(builder, llvm.load(builder, builder.add(sx_a, builder.mul(s, I64(4))), F32), V8F)
            sc_g = builder.add(sc_a, builder.mul(g, sc_st))
            z_g = builder.add(z_a, builder.mul(g, z_st))
            for c in range(8):
                sc_c = llvm.load(builder, llvm.offset(builder, sc_g, 16 * c), vec(I16, LANES))
                sc = llvm.f16_to_f32(builder, sc_c)
                z = builder.select(use_const, llvm.splat(builder, const_zero, V8F),
                                   zeros8_ir(builder, z_g, c, zero_add))
                d = builder.fsub(builder.fmul(done[c], back), builder.fmul(z, sx8))
                y_addr = llvm.offset(builder, y_a, 32 * c)
                llvm.store(builder, builder.fadd(llvm.load(builder, y_addr, V8F), builder.fmul(sc, d)), y_addr)
            return []

        llvm.sum_loop(builder, n_seg, 0, V8F, segment, "segments")
        return context.get_dummy_value()
    sig = types.void(*([types.intp] * 15), types.float32, types.float32)
    return sig, codegen


@intrinsic
def _clear_daz(typingctx):
    """MXCSR as it was (int32), with its DAZ bit now cleared on this thread."""
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once(builder, I32)
        llvm.call(builder, "llvm.x86.sse.stmxcsr", [builder.bitcast(slot, llvm.I8P)])
        old = builder.load(slot)
        builder.store(builder.and_(old, I32(~DAZ & 0xFFFFFFFF)), slot)
        llvm.call(builder, "llvm.x86.sse.ldmxcsr", [builder.bitcast(slot, llvm.I8P)])
        return old
    return types.int32(), codegen


@intrinsic
def _restore_mxcsr(typingctx, old):
    """MXCSR = old on this thread."""
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once(builder, I32)
        builder.store(args[0], slot)
        llvm.call(builder, "llvm.x86.sse.ldmxcsr", [builder.bitcast(slot, llvm.I8P)])
        return context.get_dummy_value()
    return types.void(types.int32), codegen


@njit(inline="always")
def _shift_of(row):
    """S for the subnormal-code kernel from the row's largest |x|, read from the bits (an integer maximum, which
    vectorizes): with |x| < 2^e, S = 125 - e kept within [22, 126]. NaN or infinity: S = 125, so that they
    reach the row's outputs; a zero or subnormal maximum takes the clamp's 126."""
    bits = row.view(np.int32)
    top = np.int32(0)
    for i in range(bits.shape[0]):
        top = max(top, bits[i] & np.int32(0x7FFFFFFF))
    if top >= np.int32(0x7F800000):
        return 125
    e = max(np.int64(top >> 23), 1) - 126           # frexp's exponent for a normal number
    return min(126, max(22, 125 - e))


@njit(inline="always")
def _gather_scaled(x_row, gather, u0, u1, out, mult, part):
    """out[i] = x_row[gather[i]] * mult[i % 8] for the inputs 8 u0 .. 8 u1 of a segment (0 where gather[i] is
    past the row: padding); returns their sum, added in 8 lanes (one per position in a packed word) and then
    pairwise: the 8 chains overlap, where one running sum waits for each addition."""
    n_in = x_row.shape[0]
    part[:] = 0.0
    for u in range(u0, u1):
        for t in range(8):
            src = gather[8 * u + t]
            v = x_row[src] if src < n_in else np.float32(0.0)
            part[t] += v
            out[8 * u + t] = v * mult[t]
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))


@njit(error_model="numpy", cache=True, boundscheck=False)
def scale_rows(x, gather, seg_start, xs, sumx, xsub, unscale):
    """x [N, in] in input order -> plan order, scaled, for the kernels below; one pass on one thread (the 1-row
    case is a few microseconds, less than waking the other threads):
        xs[n, i] = x[n, gather[i]] * X_SCALE[i % 8]            (0 where gather[i] == in: padding)
        sumx[n, s] = the sum of x[n] over segment s
    The rows of xsub (none, or all N) are the subnormal-code kernel's instead:
        xsub[n, i] = x[n, gather[i]] * 2^(S_n - SUB_SHIFT[i % 8]),  unscale[n] = 2^(149 - S_n)
    with S_n from _shift_of (so |x| 2^S_n < 2^125, and both powers are float32 numbers). Such a row gets xs too
    only if xs has rows (gptq_matmul_fma gives it none when pairs of strips cover every column)."""
    mult = np.empty(8, dtype=np.float32)                # the row's 2^(S_n - SUB_SHIFT[t]), if it has xsub
    part = np.empty(8, dtype=np.float32)
    for n in range(x.shape[0]):
        sub = n < xsub.shape[0]
        if sub:
            shift = _shift_of(x[n])
            for t in range(8):
                mult[t] = np.float32(2.0 ** (shift - SUB_SHIFT[t]))
            unscale[n] = np.float32(2.0 ** (149 - shift))
        for s in range(seg_start.shape[0] - 1):
            u0, u1 = seg_start[s], seg_start[s + 1]
            if sub:
                sumx[n, s] = _gather_scaled(x[n], gather, u0, u1, xsub[n], mult, part)
            if n < xs.shape[0]:
                sumx[n, s] = _gather_scaled(x[n], gather, u0, u1, xs[n], X_SCALE, part)


@njit(inline="always")
def _chunk(nr, y_a, y_st, w_a, w_st, ahead, n_packed, x_a, x_st, sx_a, sx_st, sc_a, z_a, zero_add, cz):
    if nr == 4:
        _rows4(y_a, y_st, w_a, w_st, ahead, n_packed, x_a, x_st, sx_a, sx_st, sc_a, z_a, zero_add, cz)
    elif nr == 3:
        _rows3(y_a, y_st, w_a, w_st, ahead, n_packed, x_a, x_st, sx_a, sx_st, sc_a, z_a, zero_add, cz)
    elif nr == 2:
        _rows2(y_a, y_st, w_a, w_st, ahead, n_packed, x_a, x_st, sx_a, sx_st, sc_a, z_a, zero_add, cz)
    else:
        _rows1(y_a, y_st, w_a, w_st, ahead, n_packed, x_a, x_st, sx_a, sx_st, sc_a, z_a, zero_add, cz)


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def gemv_fma(qw, xs, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, bounds, counter, threads, y,
             xsub, unscale, masks):
    """y [N, out] = x @ W for 4-bit "segments" plans, qw [S * R, W] in either layout of generic/strips.py:
    column blocks bounds[b] .. bounds[b + 1] taken in turn by `threads` threads (generic/tasks.py; counter [1]
    int64 starts at zero); per group of columns, segment, strip of 8 C columns and chunk of rows, the intrinsic above;
    columns past the last whole strip of a block take a scalar loop with the same arithmetic. One row in strips:
    a group is one strip of the layout (all its packed rows, then the next strip: the thread reads one run of
    memory). Otherwise the group is the whole block, segment by segment (in strips each packed row's word in
    the next strip is prefetched). Each output's sum runs over the segments in order either way. xsub [N, padded]
    not empty (one row): pairs of strips take _pair_subnormal, with unscale [N] and masks (SUB_MASKS); the rest
    of a block takes the kernels above."""
    n_rows, n_out = y.shape
    width, n_packed = strips.shape_of(qw, n_out)
    strip = 32 if n_rows == 1 else 16
    w_st, x_st, y_st, sx_st = width * 4, xs.strides[0], n_out * 4, sumx.shape[1] * 4
    base_w, base_x, base_y = np.int64(qw.ctypes.data), np.int64(xs.ctypes.data), np.int64(y.ctypes.data)
    base_sx, base_sc, base_z = np.int64(sumx.ctypes.data), np.int64(scales.ctypes.data), np.int64(qzeros.ctypes.data)
    sc_st, z_st = scales.shape[1] * 2, qzeros.shape[1] * 4
    cz = np.float32(const_zero)
    in_strips = width < n_out
    # one row, in strips: strip by strip (one run of memory), each packed row asked for PREFETCH_BYTES ahead;
    # more rows: segment by segment (the segment's x stays in L1), in strips each packed row asked for in the
    # next strip, the word the next call reads
    ahead = np.int64(PREFETCH_BYTES if n_rows == 1 or not in_strips else n_packed * w_st)
    pairs = xsub.shape[0] == 1 and n_rows == 1
    base_seg, base_group = np.int64(seg_start.ctypes.data), np.int64(seg_group.ctypes.data)
    n_seg = np.int64(seg_group.shape[0])
    base_xsub, base_m = np.int64(xsub.ctypes.data), np.int64(masks.ctypes.data)
    for _worker in prange(min(threads, bounds.shape[0] - 1)):          # one task loop per thread
        while True:
            j0, bw = tasks.take(counter, bounds)
            if j0 < 0:
                break
            wide = bw // strip * strip
            group = max(strip, min(width, wide)) if n_rows == 1 else max(strip, wide)
            for n in range(n_rows):
                y[n, j0:j0 + bw] = 0.0
            lo = j0
            if pairs:                                   # 64 columns a call, every segment; the rest as below
                mxcsr = _clear_daz()
                for jj in range(j0, j0 + wide - strip, 2 * strip):
                    w_0 = base_w + strips.word_offset(width, n_packed, 0, jj)
                    w_hi = base_w + strips.word_offset(width, n_packed, 0, jj + strip) - w_0
                    _pair_subnormal(base_y + jj * 4, w_0, w_hi, w_st, base_seg, base_group, n_seg, base_xsub,
                                    base_m, base_sx, base_sc + jj * 2, sc_st, base_z + (jj // 8) * 4, z_st, zero_add,
                                    cz, unscale[0])
                    lo = jj + 2 * strip
                _restore_mxcsr(mxcsr)
            for c0 in range(lo, j0 + wide, group):
                for s in range(seg_group.shape[0]):
                    u0, u1 = seg_start[s], seg_start[s + 1]
                    g = seg_group[s]
                    for jj in range(c0, min(j0 + wide, c0 + group), strip):
                        w_a = base_w + strips.word_offset(width, n_packed, u0, jj)
                        sc_a = base_sc + g * sc_st + jj * 2
                        z_a = base_z + g * z_st + (jj // 8) * 4
                        if n_rows == 1:
                            _one_row(base_y + jj * 4, y_st, w_a, w_st, ahead, u1 - u0, base_x + u0 * 32, x_st,
                                     base_sx + s * 4, sx_st, sc_a, z_a, zero_add, cz)
                        else:
                            for n0 in range(0, n_rows, 4):
                                _chunk(min(4, n_rows - n0), base_y + n0 * y_st + jj * 4, y_st, w_a, w_st, ahead,
                                       u1 - u0, base_x + n0 * x_st + u0 * 32, x_st, base_sx + n0 * sx_st + s * 4,
                                       sx_st, sc_a, z_a, zero_add, cz)
            for s in range(seg_group.shape[0]):
                u0, u1 = seg_start[s], seg_start[s + 1]
                g = seg_group[s]
                for j in range(j0 + wide, j0 + bw):
                    z = cz if cz >= 0 else \
                        np.float32((_zero_code(qzeros[g], j, 4, qzeros.shape[1]) + zero_add) & 15)
                    sc = f16_to_f32(scales[g, j])
                    for n in range(n_rows):
                        acc = np.float32(0.0)
                        for u in range(u0, u1):
                            w = np.int64(strips.word(qw, n_packed, u, j))
                            for t in range(8):
                                q = w & (np.int64(15) << (4 * t)) if t < 7 else w >> 28
                                acc = fma_f32(np.float32(q), xs[n, 8 * u + t], acc)
                        y[n, j] += sc * (acc - z * sumx[n, s])


def supports(plan):
    """A "segments" plan of 4-bit codes."""
    return plan.layout == "segments" and plan.bits == 4


def bind(plan, n_rows, blocks, threads, subnormal=None):
    """gptq_matmul_fma for x of n_rows rows on `threads` threads with everything that does not depend on x
    worked out once (kernels/gptq.py keeps it per plan for decode passes): a function x [n_rows, in] -> y.
    blocks: the column bounds the threads take in turn (generic/tasks.py: guided), or an int for blocks of that
    many columns. One row takes the subnormal-code kernel where `subnormal` (default:
    cpu.fast_subnormals()); same bits either way."""
    bounds = tasks.as_bounds(plan.n_out, blocks)                        # [blocks + 1]
    # [padded] input of each plan row (padding rows point one past the last input)
    gather = plan.gather if plan.perm is not None else np.minimum(np.arange(plan.n_padded), plan.n_in)
    if subnormal is None:
        subnormal = n_rows == 1 and fast_subnormals()
    subnormal = subnormal and n_rows == 1
    # pairs of strips cover every column when every block (the last one ends the layer) is whole pairs: then
    # only the subnormal-code kernel's activations are made
    n_xs = 0 if subnormal and not (bounds % 64).any() else n_rows
    n_sub, n_seg, n_padded, n_out = int(subnormal), len(plan.seg_group), plan.n_padded, plan.n_out
    qw, seg_start, seg_group, scales, qzeros = plan.qw, plan.seg_start, plan.seg_group, plan.scales, plan.qzeros
    zero_add, const_zero = plan.zero_add, plan.const_zero

    def call(x):
        # rows one cache line longer than the inputs, so that the rows of a chunk do not share L1 sets
        xs = np.empty((n_xs, n_padded + 16), dtype=np.float32)[:, :n_padded]  # [N or 0, padded]
        sumx = np.empty((n_rows, n_seg), dtype=np.float32)                    # [N, segments]
        xsub = np.empty((n_sub, n_padded), dtype=np.float32)                  # [1 or 0, padded]
        unscale = np.empty(n_sub, dtype=np.float32)
        scale_rows(x, gather, seg_start, xs, sumx, xsub, unscale)
        y = np.empty((n_rows, n_out), dtype=np.float32)                       # [N, out]
        gemv_fma(qw, xs, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, bounds, tasks.counter(),
                 threads, y, xsub, unscale, SUB_MASKS)
        return y
    return call


def gptq_matmul_fma(plan, x, blocks, subnormal=None):
    """y [N, out] float32 = x @ W for x [N, in] float32 in input order (supports(plan) must hold), on this
    process's threads; blocks and subnormal as in bind()."""
    return bind(plan, x.shape[0], blocks, numba.get_num_threads(), subnormal)(x)
