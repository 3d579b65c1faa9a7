"""Opt-in, NOT exact: the int8-activation prefill GEMM (vnni/int8_gemm.py) on AVX2, with the same integer sums.

What it computes is vnni/int8_gemm.py's, bit for bit (its module docstring is the statement; the NumPy reference
is in tests/test_kernels_int8_gemm.py and tests/test_kernels_avx2_prefill.py):
    tot[n, b, j] = sum_{i in block b} xq[n, i] * q[i, j]                an exact integer
    acc[n, j]    = sum over the blocks of a segment, in order, of float32(tot) * d[n, b]   (multiply, then add)
    y[n, j]     += s[g, j] * (acc[n, j] - z[g, j] * sumx[n, s])           per segment, in order
The activations are rounded, packed and summed by vnni/int8_gemm.quantize_rows (block-major xw [blocks, N, 8]:
each 8-input word's bytes as inputs 0, 2, 4, 6 | 1, 3, 5, 7), and the loops around the register tile are its
gemm_strips (strips of columns, blocks of rows, segments; the 3-bit codes transcoded to the 4-bit packing, the
last width % 8 columns taken by _scalar_columns): imported, not copied. Only the tile below is this file's.

Only the integer dot product changes. AVX2 has no vpdpbusd (four u8 x s8 products summed into an int32); it has
    vpmaddubsw (llvm.x86.avx2.pmadd.ub.sw): u8 x s8 products, adjacent pairs summed into int16 (saturating);
    vpmaddwd   (llvm.x86.avx2.pmadd.wd):    int16 x int16 products, adjacent pairs summed into int32.
Per block of 32 inputs and 8 columns (one ymm of packed words per 4 packed rows), the 8 nibble vectors are the
VNNI kernel's (w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F), and for each row
    h = sum_{k < 8} pmaddubsw(nibbles_k, broadcast x word k)      (int16 lanes, vpaddw)
    tot = pmaddwd(h, 1)                                            (int32 lanes: the block's 32 products)
Bounds, exactly: codes q are 0..15 (3-bit: 0..7), xq is in [-127, 127] (quantize_rows clips; -128 never occurs),
so one pmaddubsw lane is q0 x0 + q1 x1 with |.| <= 2 * 15 * 127 = 3810 < 32767 (no saturation), and the 8 lanes
added into one int16 lane of h are the 16 products of that lane's inputs: |h| <= 16 * 15 * 127 = 30480 < 32767
(no wrap). pmaddwd(h, 1) adds two int16 lanes into int32 exactly: the 32 products of the block, = tot.
Integer sums are exact in any order, and the float steps are the VNNI kernel's in its order (no fastmath, no
fused multiply-add), so y is bit-equal to vnni/int8_gemm.py's.

Register tile: ROWS = 8 rows x 8 columns (one ymm of 8 int32 / float32 lanes). Per block: 8 nibble vectors
(shared by the rows), and per row 1 int16 sum, 1 product, 1 broadcast x, and the row's float accumulator, kept
over the whole segment: 8 + ROWS + 3 + the ones of pmaddwd, which fits 16 ymm at ROWS = 4 with no spill. At
ROWS = 8 (16 + 4) LLVM keeps about 5 values of the block on the stack (compiled for haswell: 5 stack loads and 5
stores in a loop of about 290 instructions and 64 vpmaddubsw), and the nibbles' decode and the loop overhead are
shared by twice the rows: measured 10-20% faster than ROWS = 4 (7B shapes, 512 rows, one thread, capped to AVX2).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import llvm
from ..vnni.int8_gemm import ROW_BLOCK, gemm_strips, round_activations, supports

LANES = 8           # int32 / float32 lanes of a ymm register: columns per register tile
ROWS = 8            # activation rows per register tile (see the module docstring's budget)

__all__ = ["gptq_matmul_int8_gemm", "supports", "gemm_int8", "LANES", "ROWS"]


def _make_tile(rows):
    """An intrinsic that computes one register tile (`rows` rows x 8 columns) over one segment and folds it into
    y: vnni/int8_gemm._make_tile's arguments and float steps, with the block's integer sums on pmaddubsw +
    pmaddwd (module docstring)."""

    @intrinsic
    def tile(typingctx, y_addr, y_row_bytes, w_addr, w_row_bytes, x_addr, x_row_bytes, x_block_bytes, d_addr,
             d_row_bytes, d_block_bytes, n_blocks, s_addr, z_addr, sx_addr, sx_row_bytes):
        def codegen(context, builder, signature, args):
            (y_a, y_stride, w_a, w_stride, x_a, x_stride, x_block, d_a, d_stride, d_block, nb, s_a, z_a, sx_a,
             sx_stride) = args
            I32, I64 = llvm.I32, llvm.I64
            vi, vf = llvm.vec(I32, LANES), llvm.vec(llvm.F32, LANES)
            vb, vw = llvm.vec(llvm.I8, 4 * LANES), llvm.vec(llvm.I16, 2 * LANES)
            mask = ir.Constant(vi, [0x0F0F0F0F] * LANES)
            four = ir.Constant(vi, [4] * LANES)
            ones = ir.Constant(vw, [1] * 2 * LANES)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * LANES)) for _ in range(rows)]
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index                                            # block of the segment
                w_b = builder.add(w_a, builder.mul(b, builder.mul(w_stride, I64(4))))
                nibbles = []
                for k in range(4):                                        # the block's 4 packed words
                    w = llvm.load(builder, builder.add(w_b, builder.mul(w_stride, I64(k))), vi)
                    nibbles.append(builder.bitcast(builder.and_(w, mask), vb))                    # 8k + 0,2,4,6
                    nibbles.append(builder.bitcast(builder.and_(builder.lshr(w, four), mask), vb))  # 8k + 1,3,5,7
                for r in range(rows):
                    x_rb = builder.add(builder.add(x_a, builder.mul(x_stride, I64(r))), builder.mul(b, x_block))
                    h = None
                    for k in range(8):                                    # 4 words x (even, odd) inputs
                        xk = builder.bitcast(llvm.splat(builder, llvm.load(builder, llvm.offset(builder, x_rb, 4 * k),
                                                                           I32), vi), vb)
                        p = llvm.call(builder, "llvm.x86.avx2.pmadd.ub.sw", [nibbles[k], xk], vw)
                        h = p if h is None else builder.add(h, p)         # |h| <= 30480: exact in int16
                    total = llvm.call(builder, "llvm.x86.avx2.pmadd.wd", [h, ones], vi)   # the block's tot
                    d = llvm.load(builder, builder.add(builder.add(d_a, builder.mul(d_stride, I64(r))),
                                                       builder.mul(b, d_block)), llvm.F32)
                    part = builder.fmul(builder.sitofp(total, vf), llvm.splat(builder, d, vf))
                    builder.store(builder.fadd(builder.load(accs[r]), part), accs[r])
            s = llvm.load(builder, s_a, vf)
            z = llvm.load(builder, z_a, vf)
            for r in range(rows):
                y_r = builder.add(y_a, builder.mul(y_stride, I64(r)))
                sx = llvm.load(builder, builder.add(sx_a, builder.mul(sx_stride, I64(r))), llvm.F32)
                zsx = builder.fmul(z, llvm.splat(builder, sx, vf))
                folded = builder.fmul(s, builder.fsub(builder.load(accs[r]), zsx))
                llvm.store(builder, builder.fadd(llvm.load(builder, y_r, vf), folded), y_r)
            return context.get_dummy_value()

        return types.void(*([types.intp] * 15)), codegen

    return tile


_tile_rows = _make_tile(ROWS)
_tile_one = _make_tile(1)


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def gemm_int8(qw, bits, xw, xscale, sumx, seg_blocks, seg_group, scales, qzeros, zero_add, const_zero, row_block, y):
    """vnni/int8_gemm.gemm_int8 on this file's register tiles (ROWS rows, then single rows, x 8 columns): the
    same driver, vnni/int8_gemm.gemm_strips (arguments, loop order, _scalar_columns past the last multiple of
    8 columns), inlined here with these tiles."""
    gemm_strips(qw, bits, xw, xscale, sumx, seg_blocks, seg_group, scales, qzeros, zero_add, const_zero, row_block, y,
                LANES, ROWS, _tile_rows, _tile_one)


def gptq_matmul_int8_gemm(plan, xp):
    """y [N, out] float32 for xp [N, padded] (plan order) with the activations rounded to int8 per block:
    vnni/int8_gemm.gptq_matmul_int8_gemm's contract and result, on AVX2 (supports(plan) must hold)."""
    xw, xscale, sumx, blocks = round_activations(plan, xp)
    y = np.empty((xp.shape[0], plan.n_out), dtype=np.float32)      # [N, out]
    gemm_int8(plan.qw, plan.bits, xw, xscale, sumx, blocks, plan.seg_group, plan.scales, plan.qzeros,
              plan.zero_add, plan.const_zero, ROW_BLOCK, y)
    return y
