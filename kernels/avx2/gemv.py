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
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .. import llvm
from ..generic.block_decode import zeros8_ir
from ..generic.gptq_gemv import _zero_code
from ..generic.gptq_inplace import fma_f32
from ..generic import strips
from ..generic.half import f16_to_f32
from ..llvm import F32, I16, I32, I64, vec

LANES = 8                     # float32 lanes of a ymm register
PREFETCH_BYTES = 512          # each packed row of the segment is asked for this far ahead of the strip: 32
                              # rows in flight (16 per thread) are more than the hardware prefetchers follow
                              # when memory is contended (7B layer, 1 row, capped AVX2 on a busy host: 11.6 ->
                              # 6.4-7.6 ms; no change when the host is quiet)
V8F, V8I = vec(F32, LANES), vec(I32, LANES)
X_SCALE = np.array([16.0 ** -t for t in range(7)] + [1.0], dtype=np.float32)   # xs_i = x_i * X_SCALE[i % 8]


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


@njit(error_model="numpy", cache=True, boundscheck=False)
def scale_rows(x, gather, seg_start, xs, sumx):
    """x [N, in] in input order -> xs [N, padded] in plan order, scaled: xs[n, i] = x[n, gather[i]] *
    X_SCALE[i % 8] (0 where gather[i] == in: padding), and sumx[n, s] = the sum of x over segment s. One pass
    on one thread: the 1-row case is a few microseconds, less than waking the other threads."""
    scale = X_SCALE
    n_in = x.shape[1]
    for n in range(x.shape[0]):
        for s in range(seg_start.shape[0] - 1):
            total = np.float32(0.0)
            for i in range(seg_start[s] * 8, seg_start[s + 1] * 8):
                src = gather[i]
                v = x[n, src] if src < n_in else np.float32(0.0)
                total += v
                xs[n, i] = v * scale[i & 7]
            sumx[n, s] = total


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
def gemv_fma(qw, xs, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, block, y):
    """y [N, out] = x @ W for 4-bit "segments" plans, qw [S * R, W] in either layout of generic/strips.py:
    prange over column blocks (one per thread); per group of columns, segment, strip of 8 C columns and chunk of
    rows, the intrinsic above; columns past the last whole strip of a block take a scalar loop with the same
    arithmetic. One row in strips: a group is one strip of the layout (all its packed rows, then the next
    strip: the thread reads one run of memory). Otherwise the group is the whole block, segment by segment (in
    strips each packed row's word in the next strip is prefetched). Each output's sum runs over the segments in
    order either way."""
    n_rows = xs.shape[0]
    n_out = y.shape[1]
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
    n_blocks = (n_out + block - 1) // block
    for b in prange(n_blocks):
        j0 = b * block
        bw = min(n_out, j0 + block) - j0
        wide = bw // strip * strip
        group = max(strip, min(width, wide)) if n_rows == 1 else max(strip, wide)
        for n in range(n_rows):
            y[n, j0:j0 + bw] = 0.0
        for c0 in range(j0, j0 + wide, group):
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
                            _chunk(min(4, n_rows - n0), base_y + n0 * y_st + jj * 4, y_st, w_a, w_st, ahead, u1 - u0,
                                   base_x + n0 * x_st + u0 * 32, x_st, base_sx + n0 * sx_st + s * 4, sx_st, sc_a,
                                   z_a, zero_add, cz)
        for s in range(seg_group.shape[0]):
            u0, u1 = seg_start[s], seg_start[s + 1]
            g = seg_group[s]
            for j in range(j0 + wide, j0 + bw):
                z = cz if cz >= 0 else np.float32((_zero_code(qzeros[g], j, 4, qzeros.shape[1]) + zero_add) & 15)
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


def gptq_matmul_fma(plan, x, block):
    """y [N, out] float32 = x @ W for x [N, in] float32 in input order (supports(plan) must hold)."""
    n_rows = x.shape[0]
    gather = plan.__dict__.get("_gather_fma")
    if gather is None:                                                      # [padded] input of each plan row
        gather = plan.gather if plan.perm is not None else np.minimum(np.arange(plan.n_padded), plan.n_in)
        plan.__dict__["_gather_fma"] = gather
    # rows one cache line longer than the inputs, so that the rows of a chunk do not share L1 sets
    xs = np.empty((n_rows, plan.n_padded + 16), dtype=np.float32)[:, :plan.n_padded]   # [N, padded]
    sumx = np.empty((n_rows, len(plan.seg_group)), dtype=np.float32)        # [N, segments]
    scale_rows(x, gather, plan.seg_start, xs, sumx)
    y = np.empty((n_rows, plan.n_out), dtype=np.float32)                    # [N, out]
    gemv_fma(plan.qw, xs, sumx, plan.seg_start, plan.seg_group, plan.scales, plan.qzeros, plan.zero_add,
             plan.const_zero, block, y)
    return y
