"""Opt-in, NOT exact: 4-bit GPTQ GEMV with activations quantized to int8 and AVX512-VNNI integer dot products.

CPU runtimes (llama.cpp's Q8 activations, for example) do this to reach the memory bandwidth: the exact path
spends one AND, one int->float conversion and one FMA per weight, this one spends about a fifth of that.
It changes the results (activations rounded to 8 bits per block of 32), so it is never the default: a layer
uses it only when its `mode` is set to "int8", and the benchmark reports its accuracy next to its speed.

Layout: the same plan as gptq.gemv (segments of 4-bit packed rows, x permuted to the plan's order); every
segment must hold whole blocks of 32 codes (4 packed words), which prepare() guarantees for group sizes that
are multiples of 32 and for a single group. A packed word holds codes of 8 consecutive inputs, nibble k =
input k. `word & 0x0F0F0F0F` is then four bytes: the codes of inputs 0, 2, 4, 6; `(word >> 4) & 0x0F0F0F0F`
those of inputs 1, 3, 5, 7. vpdpbusd multiplies four unsigned bytes by four signed bytes and adds the four
products to a 32-bit lane, so with the int8 activations of inputs (0, 2, 4, 6) and (1, 3, 5, 7) packed into
two 32-bit numbers, two instructions do the 8 multiply-adds of a word for 16 columns at once.

Per block b of 32 inputs with scale d_b = max|x| / 127 and xq = round(x / d_b):
    acc_j += d_b * sum_{i in b} xq_i * q_ij                 (exact integer sum, one conversion per block)
and per segment, as in the exact path, y_j += s_j * (acc_j - z_j * sum_i d_b xq_i).

Loops: generic/block_decode.py's, as split8.py and avx2/int8.py run them: the rows of a batch are the innermost
loop, so N rows read each block of packed words from memory once. Each row's sums are added in the same order
whatever N is, so its result does not depend on its batch. The rows used to be the outermost loop here (every
row read the layer again): against that, a 7B layer's seven matmuls (2 threads, Zen 5, one process) took 0.65x
the time at 8 rows and 0.66x at 2.
"""


import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..generic import tasks
from ..generic.block_decode import decode_blocks
from .int8_gemm import round_activations
from .. import llvm

BLOCK = 32                 # inputs per activation scale (4 packed words)


@intrinsic
def _vnni_block16(typingctx, acc_addr, w_addr, row_bytes, xw_addr, scale_addr):
    """For 16 columns: acc[0:16] += d * sum over 4 packed rows of (int8 x) . (4-bit codes).

    acc_addr: float32 accumulators; w_addr: first packed word (uint32) of the 16 columns in the block's
    first row, the next rows `row_bytes` further; xw_addr: 8 int32, the int8 activations packed in fours
    (inputs 0,2,4,6 | 1,3,5,7 of each word); scale_addr: the block's scale d (float32). Written in LLVM IR
    because Numba has no vector types.
    It also asks for the same 16 columns of the rows two blocks further (llvm.prefetch, a hint that never
    faults): the 4 rows are `row_bytes` apart, separate short streams the hardware prefetchers pick up late.
    Measured from DRAM on the 7B shapes, both cores, against a plain read of the same words in the same run
    (a noisy machine): 0.65-0.72 of it without the hint, 0.67-0.83 with it.
    """
    def codegen(context, builder, signature, args):
        acc_a, w_a, stride, xw_a, sc_a = args
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v16i = ir.VectorType(i32, 16)
        v16f = ir.VectorType(ir.FloatType(), 16)
        module = builder.module
        dpbusd = llvm.declare(module, "llvm.x86.avx512.vpdpbusd.512", v16i, [v16i, v16i, v16i])

        def splat(value, vty):
            return llvm.splat(builder, value, vty)

        def vload(addr, vty, align):
            return llvm.load(builder, addr, vty, align)

        mask = ir.Constant(v16i, [0x0F0F0F0F] * 16)
        four = ir.Constant(v16i, [4] * 16)
        total = ir.Constant(v16i, [0] * 16)
        for k in range(4):                                   # 8 rows ahead = two 32-input blocks
            llvm.prefetch(builder, builder.add(w_a, builder.mul(stride, i64(8 + k))))
        for k in range(4):
            w = vload(builder.add(w_a, builder.mul(stride, i64(k))), v16i, 4)
            low = builder.and_(w, mask)
            high = builder.and_(builder.lshr(w, four), mask)
            xa = llvm.load(builder, builder.add(xw_a, i64(8 * k)), i32)
            xb = llvm.load(builder, builder.add(xw_a, i64(8 * k + 4)), i32)
            total = builder.call(dpbusd, [total, low, splat(xa, v16i)])
            total = builder.call(dpbusd, [total, high, splat(xb, v16i)])
        acc = vload(acc_a, v16f, 4)
        scaled = builder.fmul(builder.sitofp(total, v16f), splat(llvm.load(builder, sc_a, ir.FloatType()), v16f))
        llvm.store(builder, builder.fadd(acc, scaled), acc_a)
        return context.get_dummy_value()
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)
    return sig, codegen


def quantize_activations(xp):
    """xp [N, padded] float32 -> (packed int8 codes as int32 [N, padded / 4] in the vpdpbusd order,
    block scales [N, padded / 32] float32, dequantized activations x_hat [N, padded] float32).

    The readable NumPy statement of the rounding; the kernels get the same codes from
    int8_gemm.quantize_rows (one Numba pass: 3-8 us for one row of 4096-11008 inputs where these NumPy
    temporaries took 23-42 us, on every one of a decode step's 224 GEMV calls on the 7B shape)."""
    n, m = xp.shape
    blocks = xp.reshape(n, m // BLOCK, BLOCK)                                 # [N, B, 32]
    scale = np.abs(blocks).max(axis=2) / 127.0                                # [N, B]
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, :, None]), -127, 127).astype(np.int8)   # [N, B, 32]
    x_hat = (q.astype(np.float32) * scale[:, :, None]).reshape(n, m)          # [N, padded]
    words = q.reshape(n, m // 8, 8)                                           # [N, words, 8] one packed word
    order = words[:, :, [0, 2, 4, 6, 1, 3, 5, 7]]                             # even inputs, then odd inputs
    packed = np.ascontiguousarray(order).reshape(n, m).view(np.int32)         # [N, padded / 4]
    return packed, scale, x_hat


@njit(inline="always")
def _int8_rows16(acc_addr, acc_row_bytes, w_addr, row_bytes, xw_addr, xscale_addr, n_rows):
    """_vnni_block16 for every row of the batch, rows innermost: the block's 4 x 16 words stay in L1. Row n's
    activations are 32 bytes after row n - 1's (xw [blocks, N, 8] int32), its scale 4 bytes (xscale [blocks, N])."""
    for n in range(n_rows):
        _vnni_block16(acc_addr + n * acc_row_bytes, w_addr, row_bytes, xw_addr + n * 32, xscale_addr + n * 4)


@njit(inline="always")
def int8_column(qw, r, j, codes, xscale, acc, jj):
    """acc[n, jj] += d_n * the block's integer sum (rows r..r+3, column j) for every row n: the scalar form of
    the 16-column steps (this file's and avx2/int8.py's), for the columns past the last multiple of 16."""
    for n in range(acc.shape[0]):
        acc[n, jj] += np.float32(_block_sum(qw, r, j, codes, n)) * xscale[r // 4, n]


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def gemv_int8(qw, xw, xscale, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, bounds, counter,
              threads, y):
    """The int8-activation GEMV for 4-bit plans (see the module docstring): generic/block_decode's loops (column
    blocks taken in turn by the threads; per segment, block of 4 packed rows and 16 columns, every row's integer
    dot products while those words are in L1, then the fold per row) with this file's steps (_int8_rows16, and
    int8_column past the last multiple of 16 columns).

    xw [blocks, N, 8] int32, xscale [blocks, N], sumx [N, S]: the rounded activations as
    int8_gemm.quantize_rows makes them (block-major, one Numba pass, no NumPy temporaries per token)."""
    decode_blocks(qw, xw, xscale, sumx, seg_start, seg_group, scales, qzeros, zero_add, const_zero, bounds, counter,
                  threads, y, _int8_rows16, int8_column)


@njit(inline="always")
def _block_sum(qw, r, j, codes, n):
    """The exact integer sum over one block (packed rows r..r+3) of column j's codes times row n's int8
    activations: one lane of _vnni_block16's vpdpbusd sums, for the columns past the last multiple of 16."""
    total = 0
    for k in range(4):
        word = np.int64(qw[r + k, j])
        for t in range(8):
            total += ((word >> (4 * t)) & 15) * np.int64(_xq(codes, n, (r + k) * 8 + t))
    return total


@njit(inline="always")
def _xq(codes, n, i):
    """The int8 activation of input i (plan order) of row n, from codes [blocks, N, 32] (quantize_rows)."""
    t = i % 8
    slot = (t // 2) if t % 2 == 0 else 4 + t // 2                 # even inputs first, then odd
    return codes[i // BLOCK, n, i % BLOCK - t + slot]


def supports(plan):
    """int8 mode needs 4-bit codes and segments of whole 32-input blocks."""
    return plan.bits == 4 and plan.whole_blocks


def gptq_matmul_int8(plan, xp, y, blocks):
    """y [N, out] = x_hat @ W with x_hat the int8-rounded activations (xp already in plan order); blocks: the
    column bounds the threads take in turn (generic/tasks.py: guided), or an int for blocks of that size."""
    xw, xscale, sumx, _ = round_activations(plan, xp)
    bounds = tasks.as_bounds(plan.n_out, blocks)                        # [blocks + 1]
    gemv_int8(plan.qw, xw, xscale, sumx, plan.seg_start, plan.seg_group, plan.scales, plan.qzeros,
              plan.zero_add, plan.const_zero, bounds, tasks.counter(), numba.get_num_threads(), y)
    return y
