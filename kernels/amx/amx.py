"""Exact prefill on Intel AMX: float32 products from bfloat16 tiles, within float32 round-off of BLAS.

AMX (Sapphire Rapids and later) multiplies 16 x 32 by 32 x 16 bfloat16 tiles into 16 x 16 float32 tiles in one
instruction (tdpbf16ps), about 16 times the multiply-adds of an AVX-512 FMA per cycle. bfloat16 keeps only 8
significant bits, so the prefill would be approximate if x and W were simply rounded. They are split instead:

    x = x_hi + x_mid + x_lo      three bfloat16s, each the top 8 bits of what the previous ones left over:
                                 8 + 8 + 8 = 24 bits, every bit of a float32 (exactly, by truncation)
    w = w_hi + w_lo              two bfloat16s: a dequantized 2-4-bit GPTQ weight s * (q - z), |q - z| <= 15,
                                 has at most 11 + 4 = 15 significant bits (fp16 scale times a small integer)

and x . w is summed from five products, each exact in float32 (8 x 8 bits):
    x_hi w_hi + x_mid w_hi + x_lo w_hi + x_hi w_lo + x_mid w_lo
The sixth, x_lo w_lo, is below 2**-24 of x w: float32's own rounding unit, dropped. The tile unit adds the
products in float32, so the result differs from BLAS's only in the order of the additions (tests compare both
with a float64 product). Five tile products per 32 inputs still ran at about twice single-threaded BLAS's rate
(64 rows, 4096 x 4096: 147 against 80 GFLOP/s per thread). 4-bit layers whose groups are contiguous skip the
dequantization and two of the products: kernels/amx/amx_codes.py.

Layouts (all made per call, in L2-sized pieces; nothing the size of the weights):
  A  x split once per matmul: [3, rows / 16, K / 32, 16, 32] bfloat16, each 16 x 32 tile contiguous (1 KB),
     so the 16 rows of a tile do not fall into the same L1 sets (rows K * 2 bytes apart would).
  B  a slab of W (float32 [K, cols], from the same dequantize kernels the BLAS path uses) split per block of
     KC inputs into [2, KC / 2, cols] uint32: each 32-bit lane holds the bfloat16 pair (w[2k, j], w[2k + 1, j])
     that tdpbf16ps multiplies with x's pair (x[2k], x[2k + 1]) ("VNNI" order).
  C  4 accumulator tiles: 32 rows x 32 columns, loaded from / stored to y between blocks of KC inputs.

Linux gives a process the AMX register state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); kernels/cpu.py
asks once (tinyllama_ref/platform.py); where it is refused the CPU's tier is vnni and nothing here runs.
"""


import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..generic.dequantize import dequantize_code_rows
from ..generic.gptq_inplace import _widen_group_rows
from ..generic.gptq_passes import unit_shape
from ..generic.gptq_prefill import _dequantize_strip
from .. import llvm

ROWS = 32           # rows of the 2 x 2 accumulator block (2 tiles of 16)
COLS = 32           # columns of it (2 tiles of 16 float32)
KC = 1024           # inputs per block: a slab's float32 and split blocks (KC x SLAB x 4 B each = 512 KB)
                    # and 32 rows of x (3 x 32 x KC x 2 B = 192 KB) stay in L2 while they are reused
SLAB = 128          # columns per slab (one thread's unit of work), a multiple of COLS


def _tile_config():
    """The 64-byte tile configuration: palette 1, all 8 tiles 16 rows x 64 bytes."""
    cfg = np.zeros(64, dtype=np.uint8)
    cfg[0] = 1
    cfg[16:48].view(np.uint16)[:8] = 64
    cfg[48:56] = 16
    return cfg


CONFIG = _tile_config()

# -- the AMX instructions, as LLVM intrinsics (Numba has no tile types; tile numbers are constants) ---------

_I8, _I64, _VOID = ir.IntType(8), ir.IntType(64), ir.VoidType()
_I8P = _I8.as_pointer()


def _call(builder, name, args, arg_types, ret=_VOID):
    """Call an AMX intrinsic, declared with the argument types it takes (tile numbers are i8 constants)."""
    return builder.call(llvm.declare(builder.module, name, ret, arg_types), args)


def _ptr(builder, addr):
    return llvm.pointer(builder, addr, _I8)


@intrinsic
def _configure(typingctx, cfg_addr):
    """ldtilecfg: load the tile shapes (CONFIG) for this thread."""
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.ldtilecfg", [_ptr(builder, args[0])], [_I8P])
        return context.get_dummy_value()
    return types.void(types.intp), codegen


@intrinsic
def _release(typingctx):
    """tilerelease: hand the tile state back (cheaper context switches)."""
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _c_begin(typingctx, y_addr, y_stride, first):
    """C tiles 0..3 = the 32 x 32 block of y at y_addr (tile t: rows 16 (t // 2), columns 16 (t % 2)), or zero
    when first != 0."""
    def codegen(context, builder, sig, args):
        y_a, ys, first_ = args
        with builder.if_else(builder.icmp_unsigned("!=", first_, _I64(0))) as (zero, load):
            with zero:
                for t in range(4):
                    _call(builder, "llvm.x86.tilezero", [_I8(t)], [_I8])
            with load:
                for t in range(4):
                    a = builder.add(y_a, builder.add(builder.mul(ys, _I64(16 * (t // 2))), _I64(64 * (t % 2))))
                    _call(builder, "llvm.x86.tileloadd64", [_I8(t), _ptr(builder, a), ys], [_I8, _I8P, _I64])
        return context.get_dummy_value()
    return types.void(types.intp, types.intp, types.intp), codegen


@intrinsic
def _c_end(typingctx, y_addr, y_stride):
    """Store C tiles 0..3 back into the 32 x 32 block of y."""
    def codegen(context, builder, sig, args):
        y_a, ys = args
        for t in range(4):
            a = builder.add(y_a, builder.add(builder.mul(ys, _I64(16 * (t // 2))), _I64(64 * (t % 2))))
            _call(builder, "llvm.x86.tilestored64", [_I8(t), _ptr(builder, a), ys], [_I8, _I8P, _I64])
        return context.get_dummy_value()
    return types.void(types.intp, types.intp), codegen


@intrinsic
def _k_step(typingctx, a_addr, a_part, a_row16, b_addr, b_part, b_stride):
    """One step of 32 inputs: C[r, c] += sum of the five products (module docstring) of A row tile r (tiles 4,
    5: a_addr and a_addr + a_row16, parts hi/mid/lo a_part bytes apart) and B column tile c (tiles 6, 7:
    b_addr and b_addr + 64, rows b_stride apart, parts hi/lo b_part bytes apart): 20 tdpbf16ps."""
    def codegen(context, builder, sig, args):
        a, ap, ar16, b, bp, bs = args
        load_types, dot_types = [_I8, _I8P, _I64], [_I8, _I8, _I8]
        a_stride = _I64(64)
        for b_part, a_parts in ((0, (0, 1, 2)), (1, (0, 1))):
            b_base = builder.add(b, builder.mul(bp, _I64(b_part)))
            _call(builder, "llvm.x86.tileloadd64", [_I8(6), _ptr(builder, b_base), bs], load_types)
            _call(builder, "llvm.x86.tileloadd64", [_I8(7), _ptr(builder, builder.add(b_base, _I64(64))), bs],
                  load_types)
            for a_part in a_parts:
                a_base = builder.add(a, builder.mul(ap, _I64(a_part)))
                _call(builder, "llvm.x86.tileloadd64", [_I8(4), _ptr(builder, a_base), a_stride], load_types)
                _call(builder, "llvm.x86.tileloadd64", [_I8(5), _ptr(builder, builder.add(a_base, ar16)),
                                                        a_stride], load_types)
                for t in range(4):
                    _call(builder, "llvm.x86.tdpbf16ps", [_I8(t), _I8(4 + t // 2), _I8(6 + t % 2)], dot_types)
        return context.get_dummy_value()
    return types.void(*([types.intp] * 6)), codegen


# -- the splits (plain Numba loops, vectorized by LLVM) -------------------------------------------------------

@intrinsic
def _bits(typingctx, value):
    """The bits of a float32 as uint32 (a bitcast: free, and unlike a scalar .view() it vectorizes)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _float(typingctx, value):
    """The float32 whose bits are a uint32 (bitcast)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(inline="always")
def _hi_rest(v):
    """(top 16 bits of float32 v as a uint32 with the low half zero, v minus them: exact)."""
    h = _bits(v) & np.uint32(0xFFFF0000)
    return h, v - _float(h)


@njit(parallel=True, cache=True, boundscheck=False, error_model="numpy")
def split_x(x, xs):
    """x [N, K] float32 -> xs [3, Np / 16, Kp / 32, 16, 32] uint16: x's hi, mid and lo bfloat16 parts (each the
    top 16 bits of what is left), tile-major; rows and inputs past N and K stay as they are (zeros)."""
    for r in prange(x.shape[0]):
        rt, rr = r >> 4, r & 15
        for kt in range((x.shape[1] + 31) >> 5):
            k0 = kt << 5
            for k in range(k0, min(x.shape[1], k0 + 32)):
                h, rest = _hi_rest(x[r, k])
                m, low = _hi_rest(rest)                                       # low: at most 8 bits left
                xs[0, rt, kt, rr, k - k0] = np.uint16(h >> np.uint32(16))
                xs[1, rt, kt, rr, k - k0] = np.uint16(m >> np.uint32(16))
                xs[2, rt, kt, rr, k - k0] = np.uint16(_bits(low) >> np.uint32(16))


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def split_w(t, rows, cols, k0, k1, bv):
    """Rows k0..k1 of a float32 slab t [>= rows, >= cols] -> bv [2, (k1 - k0) / 2, >= cols] uint32: hi and lo
    bfloat16 parts, the pair (w[2k], w[2k + 1]) in each 32-bit lane (low half first). Rows from `rows` on
    read as zero. (t stays a whole C-contiguous array: a sliced view would compile to strided, slower code.)"""
    mask = np.uint32(0xFFFF0000)
    for p in range((k1 - k0) >> 1):
        ka, kb = k0 + 2 * p, k0 + 2 * p + 1
        hi, lo = bv[0, p], bv[1, p]
        if kb >= rows:                                       # the padding past K: zeros
            for j in range(cols):
                ha, ra = _hi_rest(t[ka, j] if ka < rows else np.float32(0.0))
                hi[j] = ha >> np.uint32(16)
                lo[j] = _bits(ra) >> np.uint32(16)
            continue
        row_a, row_b = t[ka], t[kb]
        for j in range(cols):
            ha, ra = _hi_rest(row_a[j])
            hb, rb = _hi_rest(row_b[j])
            hi[j] = (ha >> np.uint32(16)) | hb
            lo[j] = (_bits(ra) >> np.uint32(16)) | (_bits(rb) & mask)


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _block_product(xs, bv, kb, ke, y, j0, cols, first):
    """y[:Np, j0:j0 + cols] (+)= x[:, kb:ke] @ W[kb:ke, j0:j0 + cols], W's rows given split in bv (split_w's
    layout, row pair p = inputs kb + 2p, kb + 2p + 1). For every 32-row and 32-column block the 4 accumulator
    tiles start from y (from zero when first) and are stored back into y."""
    n_row_tiles, n_k_tiles = xs.shape[1], xs.shape[2]
    y_stride = y.shape[1] * 4
    a_part = n_row_tiles * n_k_tiles * 1024                  # bytes between x's hi, mid and lo
    b_stride = bv.shape[2] * 4                               # bytes between rows of bv
    b_part = bv.shape[1] * b_stride                          # bytes between W's hi and lo
    for rt in range(0, n_row_tiles, 2):
        for c0 in range(0, cols, COLS):
            y_addr = y.ctypes.data + (rt * 16 * y.shape[1] + j0 + c0) * 4
            _c_begin(y_addr, y_stride, first)
            for kt in range(kb >> 5, ke >> 5):
                a = xs.ctypes.data + (rt * n_k_tiles + kt) * 1024
                b = bv.ctypes.data + (((kt << 5) - kb) >> 1) * b_stride + c0 * 4
                _k_step(a, a_part, n_k_tiles * 1024, b, b_part, b_stride)
            _c_end(y_addr, y_stride)


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def product_segments(cfg, xs, qw, seg_start, seg_group, scales, qzeros, bits, zero_add, j0, j1, tile, bv, y):
    """y[:Np, j0:j1] = x @ W[:, j0:j1] for a "segments" plan (kernels/gptq.py), x in the plan's row order. Per
    block of KC inputs the BLAS path's own dequantizer (gptq_prefill._dequantize_strip, float32 s * (q - z))
    fills tile [KC, SLAB], split_w turns it into bv, and _block_product multiplies: every piece stays in L2
    and no float32 copy of the whole slab is made."""
    _configure(cfg.ctypes.data)
    unit_codes = unit_shape(bits)[1]
    n_in = seg_start[seg_start.shape[0] - 1] * unit_codes
    n_k = xs.shape[2] * 32
    cols = j1 - j0
    for kb in range(0, n_k, KC):
        ke = min(n_k, kb + KC)
        real = max(kb, min(ke, n_in))                        # inputs kb..real exist, real..ke are padding
        _dequantize_strip(qw, seg_start, seg_group, scales, qzeros, bits, zero_add, kb // unit_codes,
                          real // unit_codes, j0, cols, tile, 0)
        split_w(tile, real - kb, cols, 0, ke - kb, bv)
        _block_product(xs, bv, kb, ke, y, j0, cols, 1 if kb == 0 else 0)
    _release()


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def product_inplace(cfg, xs, qw, gi, scales, qzeros, bits, zero_add, n_in, j0, j1, sc, zc, tile, bv, y):
    """product_segments for an "inplace" plan (act-order read in the checkpoint's row order, a group per
    input through gi): the scales and zeros of every group are widened once per slab into sc, zc [G, cols],
    then every block of inputs is dequantized (kernels/generic/dequantize.py), split and multiplied as there. So
    streamed act-order layers multiply on the tiles too, reading their codes where they lie."""
    _configure(cfg.ctypes.data)
    n_k = xs.shape[2] * 32
    cols = j1 - j0
    _widen_group_rows(scales, qzeros, bits, zero_add, j0, cols, sc, zc)
    for kb in range(0, n_k, KC):
        ke = min(n_k, kb + KC)
        real = max(kb, min(ke, n_in))                        # inputs kb..real exist, real..ke are padding
        dequantize_code_rows(qw, kb, real, bits, j0, cols, sc, zc, gi, tile, 0, 0)
        split_w(tile, real - kb, cols, 0, ke - kb, bv)
        _block_product(xs, bv, kb, ke, y, j0, cols, 1 if kb == 0 else 0)
    _release()


def split_rows(x):
    """xs for product_segments / product_inplace: x [N, K] float32 split into tiles, rows padded to 32 and
    inputs to 32."""
    n, k = x.shape
    xs = np.zeros((3, -(-n // ROWS) * 2, -(-k // 32), 16, 32), dtype=np.uint16)
    split_x(x, xs)
    return xs


def supports(n_out, bits=4):
    """Whether the products here can serve a layer: whole 32-column blocks of y, and weights whose every value
    is two bfloat16s exactly: s * (q - z) with |q - z| <= 15 (2, 3 and 4 bits; 8-bit codes need 19 bits)."""
    return n_out % COLS == 0 and bits <= 4
