"""fp16 / bf16 weights without a float16 type: Numba on the CPU has none, so half floats travel as uint16 bits
and are widened to float32 inside the kernels with integer tricks (exact: every fp16 and bf16 value is a
float32 value).

half_linear(x, weight, dtype) is the dense linear of linear.py for F16/BF16 weights stored the Hugging Face way,
weight [out, in], y = x @ W.T. It matters for lm_head ([32000, 8192] fp16 in every GPTQ checkpoint):
  - up to FUSED_MAX_ROWS activation rows (decode, a batch of decodes, short prompts): a fused kernel converts the
    weights as it reads them, four weight rows and two activation rows at a time; no float copy at all;
  - more rows (prefill): convert a tile of rows to float32 and let BLAS multiply it.
"""

# How the OpenMP workers behind prange wait between kernels is set in tinyllama_ref/__init__.py.

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .. import llvm

FUSED_MAX_ROWS = 64        # up to this many activation rows the fused kernel beats tile-convert + BLAS: the 7B
                           # lm_head, 2 threads, Zen 5: 64 rows 105 against 120 ms capped to AVX2, 89 against
                           # 149 native; even at 96-128 rows (the widened tiles cost their float32 writes)
TILE_ROWS = 512            # weight rows widened per BLAS call in the many-rows path (16 MB at in = 8192)


@intrinsic
def f16_to_f32(typingctx, bits):
    """IEEE half bits (the low 16 bits of an integer) -> float32, exact for every value including subnormals,
    inf and NaN. Written as LLVM's own `fpext half to float`, so on x86 with F16C / AVX-512 the loop
    vectorizer turns it into vcvtph2ps (16 conversions per instruction) instead of integer bit fiddling.
    An x86 target without F16C (the generic tier) has no such instruction and LLVM would call a runtime
    function Numba does not link: there llvm.f16_to_f32 emits integer operations instead."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width > 16:
            value = builder.trunc(value, ir.IntType(16))
        return llvm.f16_to_f32(builder, value)
    return types.float32(bits), codegen


@intrinsic
def bf16_to_f32(typingctx, bits):
    """bfloat16 bits -> float32: a bfloat16 is the top half of a float32 (zero-extend, shift by 16, bitcast),
    done in 32-bit integer lanes (Numba's own integer arithmetic would widen to 64 bits and halve the SIMD
    width)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width > 16:
            value = builder.trunc(value, ir.IntType(16))
        wide = builder.shl(builder.zext(value, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(bits), codegen


@njit(inline="always")
def _widen(w, i, is_bf16):
    return bf16_to_f32(w[i]) if is_bf16 else f16_to_f32(w[i])


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def _dot4_half(x, w0, w1, w2, w3, is_bf16, y, o):
    """y[o + k] += sum_i x[i] * widen(w_k[i]) for four weight rows at once: four independent sums, so the
    multiply-adds do not wait on each other (one sum alone is bound by the FMA latency: measured 15 GB/s
    against 25 GB/s for four, lm_head of the 7B, two threads); each x[i] is loaded once for the four."""
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    for i in range(np.uint64(x.shape[0])):
        xi = x[i]
        s0 += xi * _widen(w0, i, is_bf16)
        s1 += xi * _widen(w1, i, is_bf16)
        s2 += xi * _widen(w2, i, is_bf16)
        s3 += xi * _widen(w3, i, is_bf16)
    y[o] += s0
    y[o + 1] += s1
    y[o + 2] += s2
    y[o + 3] += s3


@njit(fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def _dot_half(x, w, is_bf16):
    """sum_i x[i] * widen(w[i]): convert and multiply-add in one vectorized pass (vcvtph2ps + FMA)."""
    s = np.float32(0.0)
    for i in range(np.uint64(w.shape[0])):
        s += x[i] * _widen(w, i, is_bf16)
    return s


@njit(inline="always")
def _dot2x4_half(x0, x1, b0, b1, b2, b3, is_bf16, y, n, o):
    """y[n + r, o + k] += sum_i x_r[i] * widen(b_k[i]) for activation rows x0, x1 and weight rows b0..b3 (uint16
    bits): eight independent sums, each x and weight element loaded (and widened) once for all of them."""
    s00 = s01 = s02 = s03 = np.float32(0.0)
    s10 = s11 = s12 = s13 = np.float32(0.0)
    for i in range(np.uint64(x0.shape[0])):
        a0, a1 = x0[i], x1[i]
        w0, w1 = _widen(b0, i, is_bf16), _widen(b1, i, is_bf16)
        w2, w3 = _widen(b2, i, is_bf16), _widen(b3, i, is_bf16)
        s00 += a0 * w0
        s01 += a0 * w1
        s02 += a0 * w2
        s03 += a0 * w3
        s10 += a1 * w0
        s11 += a1 * w1
        s12 += a1 * w2
        s13 += a1 * w3
    y[n, o] += s00
    y[n, o + 1] += s01
    y[n, o + 2] += s02
    y[n, o + 3] += s03
    y[n + 1, o] += s10
    y[n + 1, o + 1] += s11
    y[n + 1, o + 2] += s12
    y[n + 1, o + 3] += s13


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, boundscheck=False)
def _fused_rows(x, weight, is_bf16, y):
    """y[n, o] = sum_i x[n, i] * W[o, i] for a few rows n, weight [out, in] as uint16 bits.

    prange over blocks of output rows o (each thread streams its own contiguous slab of the weight). Four weight
    rows at a time, in L1-sized chunks of inputs: the activation rows two at a time, convert and multiply-add
    fused (_dot2x4_half: eight sums per element loaded), an odd last row alone (_dot4_half); so each weight is
    read from memory once, and from L1 once per two rows. The 7B lm_head at 8 rows took 18.5 ms against 9.6 at
    one row, and 35-48 ms when each weight row was first widened into a float32 buffer that every activation
    row was dotted with one sum at a time (capped AVX2 on Zen 5, 2 threads). The last output rows short of
    four take one dot at a time.
    """
    n_rows, n_in = x.shape
    n_out = weight.shape[0]
    chunk = n_in if n_rows == 1 else 2048     # one row: each weight row in one pass (chunks: up to 10% slower)
    rows_per_task = 64
    for task in prange((n_out + rows_per_task - 1) // rows_per_task):
        o0 = task * rows_per_task
        o1 = min(n_out, o0 + rows_per_task)
        for n in range(n_rows):
            for o in range(o0, o1):
                y[n, o] = 0.0
        q = o0
        while q + 4 <= o1:                                  # four weight rows, chunk by chunk
            for i0 in range(0, n_in, chunk):
                i1 = min(n_in, i0 + chunk)
                w0, w1, w2, w3 = weight[q, i0:i1], weight[q + 1, i0:i1], weight[q + 2, i0:i1], weight[q + 3, i0:i1]
                for n in range(0, n_rows - 1, 2):
                    _dot2x4_half(x[n, i0:i1], x[n + 1, i0:i1], w0, w1, w2, w3, is_bf16, y, n, q)
                if n_rows % 2:
                    _dot4_half(x[n_rows - 1, i0:i1], w0, w1, w2, w3, is_bf16, y[n_rows - 1], q)
            q += 4
        for o in range(q, o1):                              # the last output rows short of four
            for n in range(n_rows):
                y[n, o] = _dot_half(x[n], weight[o], is_bf16)


@njit(error_model="numpy", cache=True, boundscheck=False, inline="always")
def _widen_row(w, is_bf16, o):
    if is_bf16:
        for i in range(np.uint64(w.shape[0])):
            o[i] = bf16_to_f32(w[i])
    else:
        for i in range(np.uint64(w.shape[0])):
            o[i] = f16_to_f32(w[i])


@njit(parallel=True, error_model="numpy", cache=True, boundscheck=False)
def widen(weight, is_bf16, out):
    """out[:] = weight as float32 (uint16 bits in, same shape out); parallel over rows."""
    for r in prange(weight.shape[0]):
        _widen_row(weight[r], is_bf16, out[r])


def half_bits(weight, dtype):
    """The uint16 bit view of an F16 (np.float16) or BF16 (already uint16) weight; no copy."""
    if dtype not in ("F16", "BF16"):
        raise ValueError(f"half_linear takes F16 or BF16 weights, got {dtype}")
    return weight.view(np.uint16)


@njit(error_model="numpy", cache=True, boundscheck=False, nogil=True)
def widen_rows(weight, is_bf16, out):
    """widen() on the calling thread only, GIL released (kernels/generic/slabs.py runs one per thread)."""
    for r in range(weight.shape[0]):
        _widen_row(weight[r], is_bf16, out[r])


def half_linear(x, weight, dtype):
    """x [N, in] float32, weight [out, in] F16/BF16 (uint16-viewable) -> x @ W.T as float32 [N, out]."""
    from ..compile_note import announce_if_cold
    from .slabs import run_slabs
    fused = x.shape[0] <= FUSED_MAX_ROWS
    announce_if_cold([_fused_rows] if fused else [widen_rows], "fp16/bf16 kernels")   # only the one that runs
    bits = half_bits(weight, dtype)                                          # [out, in] uint16
    x = np.ascontiguousarray(x, dtype=np.float32)                            # [N, in]
    n_out, n_in = bits.shape
    y = np.empty((x.shape[0], n_out), dtype=np.float32)                      # [N, out]
    if fused:
        _fused_rows(x, bits, dtype == "BF16", y)
        return y
    tiles = {}

    def work(o0, o1, worker):
        if worker not in tiles:
            tiles[worker] = np.empty(TILE_ROWS * n_in, dtype=np.float32)     # one scratch per thread
        t = tiles[worker][:(o1 - o0) * n_in].reshape(o1 - o0, n_in)          # [rows, in]
        widen_rows(bits[o0:o1], dtype == "BF16", t)
        y[:, o0:o1] = x @ t.T                                                # [N, o1 - o0]
    run_slabs(n_out, TILE_ROWS, work)
    return y
