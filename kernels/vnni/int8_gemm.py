"""Opt-in, NOT exact: the int8-activation GEMM for prefill, reading the packed 4- and 3-bit GPTQ codes.

The many-row counterpart of kernels/vnni/int8.py (same rounding of the activations, same "segments" plans). The
exact prefill (gptq_prefill.py) widens every weight to float32 and multiplies with BLAS: one FMA per weight
per row. Here the weights stay 4-bit and the activations are int8, so AVX512-VNNI's vpdpbusd does 64
multiply-adds per instruction (16 columns x 4 bytes) where an FMA does 16: the same idea as llama.cpp's Q8_0
activations against Q4_0 weights, but on GPTQ's own packing (no conversion at load).

The arithmetic, which tests/test_kernels_int8_gemm.py repeats in NumPy and compares for EQUALITY:
    xq[n, i], d[n, b]     int8 activations and their scale per row and block b of 32 inputs (int8.py)
    tot[n, b, j]          = sum_{i in b} xq[n, i] * q[i, j]          an exact int32 (|tot| <= 32*127*15)
    acc[n, j]             = sum over the blocks b of a segment, in order, of float32(tot) * d[n, b]
                            (float32 multiply, then float32 add, starting from 0; never a fused multiply-add)
    sumx[n, s]            = the same sum with tot replaced by sum_{i in b} xq[n, i]
    y[n, j]              += s[g, j] * (acc[n, j] - z[g, j] * sumx[n, s])   per segment s of group g, in order
All float steps are single IEEE float32 operations in a fixed order (no fastmath here), so a NumPy reference
that takes the same steps reproduces every bit.

Register tile: ROWS activation rows x 16 columns. Per block of 32 inputs the 4 packed words of the 16 columns
are loaded once and split into 8 vectors of nibbles (`w & 0x0F0F0F0F`: inputs 0, 2, 4, 6 of each word;
`(w >> 4) & 0x0F0F0F0F`: inputs 1, 3, 5, 7), then every row adds its 8 vpdpbusd (its int8 activations
broadcast from memory, packed in that order by quantize_rows) into an int32 vector, converts it and adds it
with its scale. The ROWS accumulators stay in registers for a whole segment; the fold is vector code too.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..generic import strips
from ..generic.gptq_gemv import _unpack_zero_row
from ..generic.half import f16_to_f32
from .. import llvm

BLOCK = 32          # inputs per activation scale: 4 packed words of 4-bit codes
LANES = 16          # float32 / int32 lanes of a 512-bit vector: columns per register tile
ROWS = 8            # activation rows per register tile: 8 int32 + 8 float32 accumulators + 8 nibble vectors
CHAINS = 2          # vpdpbusd dependency chains per row and block (latency ~5 cycles, several per cycle)
ROW_BLOCK = 64      # rows whose int8 activations of one segment (64 x 128 B at group 128) stay in L1 while
                    # the strip's 16 tiles of the segment's codes (16 KB) are reused across them
STRIP = 256         # columns per parallel task (16 tiles); measured: 64 streams poorly at 16 rows


def _make_tile(rows):
    """An intrinsic that computes one register tile (`rows` rows x 16 columns) over one segment and folds it
    into y. Written in LLVM IR because Numba has no vector types; `rows` is fixed when the IR is built."""

    @intrinsic
    def tile(typingctx, y_addr, y_row_bytes, w_addr, w_row_bytes, x_addr, x_row_bytes, x_block_bytes, d_addr,
             d_row_bytes, d_block_bytes, n_blocks, s_addr, z_addr, sx_addr, sx_row_bytes):
        """y[r, 0:16] += s * (acc_r - z * sumx[r]) for r < rows, acc_r as in the module docstring.

        y_addr: float32 y[row 0, column 0 of the tile]; w_addr: the segment's first packed word of the tile's
        16 columns (the next packed row w_row_bytes further); x_addr: row 0's first packed int8 word of the
        segment (rows x_row_bytes, blocks x_block_bytes apart); d_addr: row 0's scale of the segment's first
        block (rows d_row_bytes, blocks d_block_bytes apart); s_addr, z_addr:
        16 float32 scales and zeros of the tile's columns; sx_addr: row 0's sumx of the segment.
        """
        def codegen(context, builder, signature, args):
            (y_a, y_stride, w_a, w_stride, x_a, x_stride, x_block, d_a, d_stride, d_block, nb, s_a, z_a, sx_a,
             sx_stride) = args
            i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
            v16i, v16f = ir.VectorType(i32, LANES), ir.VectorType(f32, LANES)
            module = builder.module
            dpbusd = llvm.declare(module, "llvm.x86.avx512.vpdpbusd.512", v16i, [v16i] * 3)

            def splat(value, vty):
                return llvm.splat(builder, value, vty)

            def load(addr, ty):
                return llvm.load(builder, addr, ty)

            def store(value, addr):
                llvm.store(builder, value, addr)

            mask = ir.Constant(v16i, [0x0F0F0F0F] * LANES)
            four = ir.Constant(v16i, [4] * LANES)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * LANES)) for _ in range(rows)]
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index                                            # block of the segment
                w_b = builder.add(w_a, builder.mul(b, builder.mul(w_stride, i64(4))))
                nibbles = []
                for k in range(4):                                        # the block's 4 packed words
                    w = load(builder.add(w_b, builder.mul(w_stride, i64(k))), v16i)
                    nibbles.append(builder.and_(w, mask))                 # inputs 8k + 0, 2, 4, 6
                    nibbles.append(builder.and_(builder.lshr(w, four), mask))   # inputs 8k + 1, 3, 5, 7
                for r in range(rows):
                    x_rb = builder.add(builder.add(x_a, builder.mul(x_stride, i64(r))), builder.mul(b, x_block))
                    chains = [ir.Constant(v16i, [0] * LANES)] * CHAINS    # independent sums: shorter
                    for k in range(8):                                    # 4 words x (even, odd) inputs
                        xk = load(builder.add(x_rb, i64(4 * k)), i32)
                        chains[k % CHAINS] = builder.call(dpbusd, [chains[k % CHAINS], nibbles[k], splat(xk, v16i)])
                    total = chains[0]
                    for other in chains[1:]:                              # integer sums: order is exact
                        total = builder.add(total, other)
                    d = load(builder.add(builder.add(d_a, builder.mul(d_stride, i64(r))), builder.mul(b, d_block)),
                             f32)
                    part = builder.fmul(builder.sitofp(total, v16f), splat(d, v16f))
                    builder.store(builder.fadd(builder.load(accs[r]), part), accs[r])
            s = load(s_a, v16f)
            z = load(z_a, v16f)
            for r in range(rows):
                y_r = builder.add(y_a, builder.mul(y_stride, i64(r)))
                sx = load(builder.add(sx_a, builder.mul(sx_stride, i64(r))), f32)
                folded = builder.fmul(s, builder.fsub(builder.load(accs[r]), builder.fmul(z, splat(sx, v16f))))
                store(builder.fadd(load(y_r, v16f), folded), y_r)
            return context.get_dummy_value()

        sig = types.void(*([types.intp] * 15))
        return sig, codegen

    return tile


_tile_rows = _make_tile(ROWS)
_tile_one = _make_tile(1)


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def quantize_rows(xp, seg_blocks, xw, xscale, sumx):
    """The int8 activations of xp [N, padded] (plan order), as int8.quantize_activations rounds them, stored
    block-major so that a tile's rows of one block are 8 x 32 contiguous bytes (rows a power-of-two apart would
    fall into the same few L1 sets):
        xw [blocks, N, 8] int32: each 8-input word's int8 codes as inputs 0,2,4,6 | 1,3,5,7
        xscale [blocks, N] float32: max|x| / 127, 1 for an all-zero block
        sumx [N, S] float32: see the module docstring, for the segments starting at blocks seg_blocks [S + 1].
    prange over rows; no fastmath, so the rounding is NumPy's (round half to even)."""
    n_rows, n_in = xp.shape
    codes = xw.view(np.int8)                                              # [blocks, N, 32] bytes
    for n in prange(n_rows):
        for b in range(n_in // BLOCK):
            top = np.float32(0.0)
            for i in range(b * BLOCK, b * BLOCK + BLOCK):
                top = max(top, abs(xp[n, i]))
            d = top / np.float32(127.0)
            if not d > 0:
                d = np.float32(1.0)
            xscale[b, n] = d
            for i in range(BLOCK):
                q = min(max(np.rint(xp[n, b * BLOCK + i] / d), np.float32(-127.0)), np.float32(127.0))
                t = i % 8
                slot = (t // 2) if t % 2 == 0 else 4 + t // 2             # even inputs first, then odd
                codes[b, n, i - t + slot] = np.int8(q)
        for s in range(seg_blocks.shape[0] - 1):
            total = np.float32(0.0)
            for b in range(seg_blocks[s], seg_blocks[s + 1]):
                isum = 0
                for i in range(BLOCK):
                    isum += np.int64(codes[b, n, i])
                total = total + np.float32(isum) * xscale[b, n]
            sumx[n, s] = total


@njit(inline="always")
def _transcode_3bit(qw, j0, width, words):
    """words[4u + k, j] = the 4-bit packing (nibble e = code 8k + e) of the 32 codes that 3-bit unit u of
    column j0 + j holds in qw[3u:3u + 3] (one 96-bit stream: code t at bit 3t, codes 10 and 21 straddle two
    words). So one tile kernel serves both widths; the copy is one strip's codes, never the layer."""
    for u in range(qw.shape[0] // 3):
        for j in range(np.uint64(width)):
            lo = np.uint64(qw[3 * u, j0 + j]) | (np.uint64(qw[3 * u + 1, j0 + j]) << np.uint64(32))
            hi = np.uint64(qw[3 * u + 2, j0 + j])
            for k in range(4):
                word = np.uint64(0)
                for e in range(8):
                    t = 8 * k + e
                    if 3 * t + 3 <= 64:
                        code = lo >> np.uint64(3 * t)
                    elif 3 * t >= 64:
                        code = hi >> np.uint64(3 * t - 64)
                    else:
                        code = (lo >> np.uint64(3 * t)) | (hi << np.uint64(64 - 3 * t))
                    word |= (code & np.uint64(7)) << np.uint64(4 * e)
                words[4 * u + k, j] = np.uint32(word)


@njit(error_model="numpy", cache=True, boundscheck=False)
def _scalar_columns(words, c0, c1, col, codes, xscale, sumx, b0, nb, s_buf, z_buf, s, j_lo, y, y_col, n0, n1):
    """Columns c0..c1 of words (4-bit packing; its column c is output column y_col + c - col), rows n0..n1, the
    slow way with the same steps as the tiles: for the last width % 16 columns of a layer."""
    for c in range(c0, c1):
        j = y_col + c - col
        for n in range(n0, n1):
            acc = np.float32(0.0)
            for b in range(b0, b0 + nb):
                total = 0
                for k in range(4):
                    word = np.int64(words[b * 4 + k, c])
                    for e in range(8):
                        slot = (e // 2) if e % 2 == 0 else 4 + e // 2
                        total += ((word >> (4 * e)) & 15) * np.int64(codes[b, n, k * 8 + slot])
                acc = acc + np.float32(total) * xscale[b, n]
            y[n, j] = y[n, j] + s_buf[j - j_lo] * (acc - z_buf[j - j_lo] * sumx[n, s])


@njit(inline="always")
def gemm_strips(qw, bits, xw, xscale, sumx, seg_blocks, seg_group, scales, qzeros, zero_add, const_zero, row_block, y,
                lanes, tile_height, tile_rows, tile_one):
    """y [N, out] = the module docstring's sum, for a 4- or 3-bit "segments" plan (seg_blocks [S + 1]: the
    first block of 32 inputs of each segment), on register tiles of `lanes` columns: tile_rows computes
    `tile_height` rows of one, tile_one a single row (intrinsics with _make_tile's arguments).

    prange over strips of STRIP columns; in each, rows in blocks of row_block, segment by segment, register
    tiles of tile_height rows (then single rows). 3-bit strips are first transcoded to the 4-bit packing
    (_transcode_3bit) in a scratch of blocks x 4 x STRIP words. Columns past the last multiple of `lanes` take
    _scalar_columns. 4-bit qw may be in either layout of generic/strips.py (a plan in strips has whole strips of 32
    or 64 columns, so never a scalar column).

    The driver of every tier's gemm_int8 (this file's, avx2/int8_gemm.py's): inlined into it by Numba
    (inline="always", before typing), so each tier's compiled loop calls its own tile intrinsics directly and is
    cached with its own file. A factory closing over the intrinsics would not be: Numba keys a closure's cache
    on its pickled cells, and an intrinsic pickles with a fresh uuid in every process."""
    n_rows = xw.shape[1]
    n_out = y.shape[1]
    qw_width, qw_packed = strips.shape_of(qw, n_out)                       # 4-bit qw in either layout
    n_blocks = seg_blocks[seg_blocks.shape[0] - 1]
    x_row_bytes, x_block_bytes = 32, n_rows * 32                         # xw [blocks, N, 8] int32
    d_row_bytes, d_block_bytes = 4, n_rows * 4                            # xscale [blocks, N]
    sx_row_bytes = sumx.shape[1] * 4
    y_row_bytes = n_out * 4
    base_x = np.int64(xw.ctypes.data)
    base_d, base_sx, base_y = np.int64(xscale.ctypes.data), np.int64(sumx.ctypes.data), np.int64(y.ctypes.data)
    codes = xw.view(np.int8)                                              # [blocks, N, 32]
    for t in prange((n_out + STRIP - 1) // STRIP):
        j0 = t * STRIP
        width = min(n_out, j0 + STRIP) - j0
        vec = width // lanes * lanes
        s_buf = np.empty(STRIP, dtype=np.float32)
        z_buf = np.empty(STRIP, dtype=np.float32)
        s_addr, z_addr = np.int64(s_buf.ctypes.data), np.int64(z_buf.ctypes.data)
        words = np.empty((n_blocks * 4 if bits == 3 else 0, STRIP), dtype=np.uint32)   # [blocks * 4, STRIP]
        if bits == 3:
            _transcode_3bit(qw, j0, width, words)
            base_w, w_width, w_packed, col = np.int64(words.ctypes.data), STRIP, n_blocks * 4, 0
        else:
            base_w, w_width, w_packed, col = np.int64(qw.ctypes.data), qw_width, qw_packed, j0
        w_row_bytes = w_width * 4
        for n in range(n_rows):
            for j in range(width):
                y[n, j0 + j] = 0.0
        for rb in range(0, n_rows, row_block):
            rb_end = min(n_rows, rb + row_block)
            for s in range(seg_group.shape[0]):
                g = seg_group[s]
                b0, nb = seg_blocks[s], seg_blocks[s + 1] - seg_blocks[s]
                for j in range(width):
                    s_buf[j] = f16_to_f32(scales[g, j0 + j])
                if const_zero >= 0:
                    z_buf[:width] = np.float32(const_zero)
                else:
                    _unpack_zero_row(qzeros[g], j0, width, bits, zero_add, z_buf)
                for c in range(0, vec, lanes):
                    w_addr = base_w + strips.word_offset(w_width, w_packed, b0 * 4, col + c)
                    r0 = rb
                    while r0 < rb_end:
                        rows = tile_height if r0 + tile_height <= rb_end else 1
                        args = (base_y + r0 * y_row_bytes + (j0 + c) * 4, y_row_bytes, w_addr, w_row_bytes,
                                base_x + r0 * x_row_bytes + b0 * x_block_bytes, x_row_bytes, x_block_bytes,
                                base_d + r0 * d_row_bytes + b0 * d_block_bytes, d_row_bytes, d_block_bytes, nb,
                                s_addr + c * 4, z_addr + c * 4, base_sx + r0 * sx_row_bytes + s * 4, sx_row_bytes)
                        if rows == tile_height:
                            tile_rows(*args)
                        else:
                            tile_one(*args)
                        r0 += rows
                if vec < width:
                    if bits == 3:
                        _scalar_columns(words, vec, width, 0, codes, xscale, sumx, b0, nb, s_buf, z_buf, s, j0, y,
                                        j0, rb, rb_end)
                    else:
                        _scalar_columns(qw, j0 + vec, j0 + width, j0, codes, xscale, sumx, b0, nb, s_buf, z_buf, s,
                                        j0, y, j0, rb, rb_end)


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def gemm_int8(qw, bits, xw, xscale, sumx, seg_blocks, seg_group, scales, qzeros, zero_add, const_zero, row_block, y):
    """gemm_strips on this file's register tiles: ROWS rows (then single rows) x 16 columns."""
    gemm_strips(qw, bits, xw, xscale, sumx, seg_blocks, seg_group, scales, qzeros, zero_add, const_zero, row_block, y,
                LANES, ROWS, _tile_rows, _tile_one)


def segment_blocks(plan):
    """[S + 1] first block of 32 inputs of each segment: 4 packed words per block at 4 bits, one unit (3 words,
    32 codes) at 3 bits."""
    return plan.seg_start // 4 if plan.bits == 4 else plan.seg_start


def supports(plan):
    """A "segments" plan of 4-bit codes whose segments hold whole blocks of 32 inputs, or of 3-bit codes
    (whose units are such blocks)."""
    if plan.layout != "segments":
        return False
    return plan.bits == 3 or (plan.bits == 4 and plan.whole_blocks)


def round_activations(plan, xp):
    """xp [N, padded] (plan order) rounded to int8 per block by quantize_rows, as every int8-mode kernel (decode
    and prefill, VNNI and AVX2) reads it: (xw [blocks, N, 8] int32, xscale [blocks, N], sumx [N, S], and the
    segments' first blocks [S + 1])."""
    n_rows, n_padded = xp.shape
    xw = np.empty((n_padded // BLOCK, n_rows, 8), dtype=np.int32)        # [blocks, N, 8]
    xscale = np.empty((n_padded // BLOCK, n_rows), dtype=np.float32)     # [blocks, N]
    sumx = np.empty((n_rows, len(plan.seg_group)), dtype=np.float32)     # [N, segments]
    blocks = segment_blocks(plan)                                        # [S + 1]
    quantize_rows(xp, blocks, xw, xscale, sumx)
    return xw, xscale, sumx, blocks


def gptq_matmul_int8_gemm(plan, xp):
    """y [N, out] float32 for xp [N, padded] (plan order) with the activations rounded to int8 per block."""
    xw, xscale, sumx, blocks = round_activations(plan, xp)
    y = np.empty((xp.shape[0], plan.n_out), dtype=np.float32)      # [N, out]
    gemm_int8(plan.qw, plan.bits, xw, xscale, sumx, blocks, plan.seg_group, plan.scales, plan.qzeros,
              plan.zero_add, plan.const_zero, ROW_BLOCK, y)
    return y
