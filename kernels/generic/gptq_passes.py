"""The innermost loops of the fused GPTQ GEMV: one "pass" accumulates x . codes over a few packed rows.

A pass adds, for every column j of a column block,
    acc[j] += sum_t x[i + t] * code[t, j]
over the codes t held by `nwords` consecutive packed rows r.. of qw [R, out] (uint32, codes packed along
the input axis, as GPTQ stores them). Scales and zeros are NOT applied here: gptq_gemv.py folds them in
once per group (the group-sum factorisation).

How one code costs one AND, one int->float conversion and one fused multiply-add:
  - No shifts. Code t sits at bit offset o of its word; float(word & (mask << o)) is q * 2**o exactly (at
    most 8 significant bits), so multiplying it by c_t = x_t * 2**-o (made once per pass, outside the column
    loop) gives x_t * q exactly. (x * 2**-o only loses bits for |x| < 2**-95, far below what float32 sums
    can see.) masked_f32 keeps the AND and the conversion in 32-bit lanes: Numba's own integer arithmetic
    widens to 64 bits, which halves the SIMD width. The conversion is a signed one (no AVX2 instruction
    converts unsigned integers); only a word's top code needs more, 3 operations without AVX-512 (_code_f32).
  - 3 bits: a unit of 3 words holds 32 codes, two of which straddle a word boundary. Words 1 and 2 are
    shifted right by 1 and 2 bits first, so the 30 whole codes of all three words sit at offsets 0, 3, ..., 27
    and share 10 masks (fewer live registers); each straddler is cut out of the two words it spans with one
    funnel shift (funnel_f32: AVX-512 VBMI2 vpshrdd).
  - The column loop is innermost: columns are contiguous in every packed row, so LLVM vectorizes it 16 columns
    per AVX-512 instruction.
  - The terms are added in a tree of short chains (at most 4 FMAs each), written out explicitly. The passes
    are compiled WITHOUT fastmath's "reassoc" flag (PASS_MATH) because with it LLVM rebuilds the tree into one
    32-long dependent FMA chain: measured 1.3-1.7x slower in cache on this machine.
  - Columns are visited in chunks of CHUNK. Before each chunk the pass asks for the same columns of the packed
    rows `ahead` rows further down (the next pass): in GPTQ's layout the rows of a pass are `out` words apart,
    separate short streams that the hardware prefetchers pick up late. Measured on the 70B shapes, both
    cores, one run: 4-bit 8192x28672 25.9 -> 35.2 GB/s together with one column block per thread (gemv_block).

The passes are long, so they are written by pass_source() and checked in as ordinary source below rather
than exec'd at import: Numba's on-disk cache keys a function by its file and line, so exec'd code would be
recompiled by every process (seconds per pass), and a traceback or profile of checked-in code points at a
real line. tests/test_kernels_gptq.py fails if they drift from pass_source(); after changing the generator
run `python tools/regenerate_passes.py` (it rewrites them; --check only compares). Print one with `python -c "from tinyllama_ref.kernels.gptq_passes import pass_source;
print(pass_source(4, 4))"`.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# fastmath without "reassoc": contract still fuses multiply-adds, but LLVM keeps the written order of sums.
PASS_MATH = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}
CHUNK = 128            # columns per chunk: 512 bytes of each packed row, prefetched one pass ahead
PASSES = {4: (4, 1), 3: (3,), 2: (2, 1), 8: (4, 1)}   # words per pass, longest first, for each bit width


def _i32(builder, value):
    i32 = ir.IntType(32)
    width = value.type.width
    return builder.trunc(value, i32) if width > 32 else builder.zext(value, i32) if width < 32 else value


def _unsigned_conversion_is_one_instruction():
    """True unless LLVM compiles for an x86 CPU below AVX-512F (kernels/cpu.py's process tier): AVX-512 has
    vcvtudq2ps and aarch64 ucvtf, while AVX2 and SSE expand an unsigned conversion to about 20 operations."""
    from ..cpu import at_least, process_tier
    from ...platform import is_x86_64
    return not is_x86_64() or at_least(process_tier(), "avx512")


def _code_f32(builder, value, mask):
    """float32(value & mask) for a 32-bit lane, exactly, without an unsigned conversion where it is costly.

    An unsigned int -> float conversion is one instruction on AVX-512 (vcvtudq2ps) but none on AVX2, where
    LLVM expands it to 5 operations. A masked code below 2^31 converts as a signed number (vcvtdq2ps, the
    same float). The top code of a word (mask >= 2^31, its lowest bit at offset o), where the target lacks
    vcvtudq2ps, is shifted down and ORed into the mantissa of 2^(23 + o), whose last place is worth 2^o:
    that float is 2^(23 + o) + q 2^o, and subtracting 2^(23 + o) leaves q 2^o exactly (the 2^23 | q of
    kernels/avx512/gptq_tiles.py, scaled): shift, OR, subtract, the same float bit for bit. (float32(word >>
    o) * 2^o is exact too, but LLVM folds it back into the unsigned conversion.) On AVX2 this takes the
    4-bit GEMV's inner loop from 149 to 134 instructions per 256 weights (haswell target, LLVM 22)."""
    f32 = ir.FloatType()
    if mask < 2 ** 31:
        return builder.sitofp(builder.and_(value, ir.Constant(value.type, mask)), f32)
    if _unsigned_conversion_is_one_instruction():
        return builder.uitofp(builder.and_(value, ir.Constant(value.type, mask)), f32)
    offset = (mask & -mask).bit_length() - 1                      # the code's lowest bit
    top = builder.lshr(value, ir.Constant(value.type, offset))
    if mask != (0xFFFFFFFF >> offset) << offset:                  # bits above the code: mask them too
        top = builder.and_(top, ir.Constant(value.type, mask >> offset))
    magic = np.float32(2.0 ** (23 + offset))
    with_code = builder.or_(top, ir.Constant(value.type, int(magic.view(np.uint32))))
    return builder.fsub(builder.bitcast(with_code, f32), ir.Constant(f32, float(magic)))


def _literal(ty):
    """The value of an integer literal type (a mask written as a constant in the pass source), else None."""
    return ty.literal_value if isinstance(ty, types.IntegerLiteral) else None


@intrinsic(prefer_literal=True)
def masked_f32(typingctx, word, mask):
    """float32(word & mask) computed on 32-bit integers: AND and a signed conversion (vpandd + vcvtdq2ps),
    the top code shifted instead (_code_f32)."""
    if not isinstance(word, types.Integer) or not isinstance(mask, types.Integer):
        return None
    constant = _literal(mask)

    def codegen(context, builder, signature, args):
        w, m = (_i32(builder, a) for a in args)
        if constant is None:
            return builder.uitofp(builder.and_(w, m), ir.FloatType())
        return _code_f32(builder, w, constant & 0xFFFFFFFF)
    return types.float32(word, mask), codegen


@intrinsic(prefer_literal=True)
def funnel_f32(typingctx, low, high, shift, mask):
    """float32(((high:low) >> shift) & mask) on 32-bit lanes: the bits of a code that starts at bit `shift` of
    word `low` and ends in word `high` (llvm.fshr; AVX-512 VBMI2: vpshrdd)."""
    if not all(isinstance(a, types.Integer) for a in (low, high, shift, mask)):
        return None
    constant = _literal(mask)

    def codegen(context, builder, signature, args):
        lo, hi, s, m = (_i32(builder, a) for a in args)
        i32 = ir.IntType(32)
        fshr = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [i32, i32, i32]),
                                              "llvm.fshr.i32")
        both = builder.call(fshr, [hi, lo, s])
        if constant is None:
            return builder.uitofp(builder.and_(both, m), ir.FloatType())
        return _code_f32(builder, both, constant & 0xFFFFFFFF)
    return types.float32(low, high, shift, mask), codegen


@intrinsic
def shift_right_u32(typingctx, word, shift):
    """word >> shift on a 32-bit unsigned lane (kept 32 bits wide, unlike Numba's integer promotion)."""
    if not isinstance(word, types.Integer) or not isinstance(shift, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        w, s = (_i32(builder, a) for a in args)
        return builder.lshr(w, s)
    return types.uint32(word, shift), codegen


@intrinsic
def or_code_u32(typingctx, acc, word, shift, mask, to):
    """acc | (((word >> shift) & mask) << to) on 32-bit unsigned lanes: move one packed code to another bit
    offset (kernels/gptq.py's repack), without Numba's widening to 64 bits."""
    if not all(isinstance(a, types.Integer) for a in (acc, word, shift, mask, to)):
        return None

    def codegen(context, builder, signature, args):
        a, w, s, m, t = (_i32(builder, v) for v in args)
        return builder.or_(a, builder.shl(builder.and_(builder.lshr(w, s), m), t))
    return types.uint32(acc, word, shift, mask, to), codegen


@intrinsic
def prefetch_row(typingctx, arr, row, col):
    """Hint the CPU to load the cache line holding arr[row, col] of a 2-D array (llvm.prefetch: read, keep in
    all cache levels, data). A hint only: never faults, so the caller need not stop exactly at the end."""
    if not isinstance(arr, types.Array) or arr.ndim != 2:
        return None

    def codegen(context, builder, sig, args):
        aty = sig.args[0]
        a, r, c = args
        ary = context.make_array(aty)(context, builder, a)
        r = context.cast(builder, r, sig.args[1], types.intp)
        c = context.cast(builder, c, sig.args[2], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [r, c], wraparound=False, boundscheck=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])       # (address, rw, locality, cache type)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(arr, row, col), codegen


@njit(cache=True)
def unit_shape(bits):
    """(words, codes) of the smallest run of packed words that holds whole codes: the one formula for it,
    callable from Python and from the kernels (a 3-word unit holds 32 3-bit codes; one word 32 // bits)."""
    return (3, 32) if bits == 3 else (1, 32 // bits)


def pass_terms(bits, nwords):
    """What a pass computes, as data: a list of (code index t, power of two p, word expression) meaning
    x[i + t] * 2**p * float(word expression), plus the per-row word variables the expressions use. Summed over
    the list this is sum_t x[i + t] * code_t exactly (tests/test_kernels_gptq.py checks it bit by bit)."""
    words = [f"a{w} = w{w}[j]" for w in range(nwords)]
    terms = []
    if bits != 3:
        per_word = 32 // bits
        for w in range(nwords):
            for k in range(per_word):
                off = bits * k
                terms.append((w * per_word + k, -off, f"masked_f32(a{w}, 0x{((1 << bits) - 1) << off:08X})"))
        return words, terms
    for u in range(nwords // 3):
        a, b, c = 3 * u, 3 * u + 1, 3 * u + 2
        t0 = 32 * u
        # Word b >> 1 and word c >> 2 put their whole codes at offsets 0, 3, ..., 27, like word a.
        words += [f"v{b} = shift_right_u32(a{b}, 1)", f"v{c} = shift_right_u32(a{c}, 2)"]
        for base, name in ((t0, f"a{a}"), (t0 + 11, f"v{b}"), (t0 + 22, f"v{c}")):
            for k in range(10):
                terms.append((base + k, -3 * k, f"masked_f32({name}, 0x{7 << (3 * k):08X})"))
        terms.append((t0 + 10, 0, f"funnel_f32(a{a}, a{b}, 30, 7)"))     # bits 30..32 of the unit
        terms.append((t0 + 21, 0, f"funnel_f32(a{b}, a{c}, 31, 7)"))     # bits 63..65
    return words, terms


def pass_source(bits, nwords):
    """The Python source of _pass_b{bits}_w{nwords} (see the module docstring)."""
    words, terms = pass_terms(bits, nwords)
    ncodes = nwords * 32 // bits
    lines = ['@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)',
             f"def _pass_b{bits}_w{nwords}(qw, r, x, i, acc, j0, width, ahead):",
             f'    """acc[j] += sum of x[i + t] * code[t, j0 + j] over the {ncodes} {bits}-bit codes in packed rows '
             f'r..r+{nwords - 1};\n    ahead > 0: prefetch rows r+ahead.. chunk by chunk."""']
    for w in range(nwords):
        lines.append(f"    w{w} = qw[r + {w}, j0:j0 + width]")
    coef = {}
    for t, p, _ in terms:
        if (t, p) not in coef:
            coef[(t, p)] = f"c{t}" if p == 0 else f"c{t}_{-p}"
            scale = f" * np.float32({2.0 ** p!r})" if p else ""
            lines.append(f"    {coef[(t, p)]} = x[i + {t}]{scale}")
    lines += ["    for k0 in range(0, width, CHUNK):",
              "        k1 = min(width, k0 + CHUNK)",
              "        if ahead > 0:",
              "            for k in range(k0, k1, 16):"]
    lines += [f"                prefetch_row(qw, r + ahead + {w}, j0 + k)" for w in range(nwords)]
    lines.append("        for j in range(np.uint64(k0), np.uint64(k1)):")
    lines += [f"            {w}" for w in words]
    sums = []
    for n in range(0, len(terms), 4):            # chains of at most 4 multiply-adds
        sums.append(f"s{n // 4}")
        parts = [f"{coef[(t, p)]} * {expr}" for t, p, expr in terms[n:n + 4]]
        lines.append(f"            s{n // 4} = (" + ("\n" + " " * 18 + "+ ").join(parts) + ")")
    while len(sums) > 1:                         # then add the chains pairwise: a tree
        pairs = [f"({a} + {b})" for a, b in zip(sums[::2], sums[1::2])]
        sums = pairs + (sums[-1:] if len(sums) % 2 else [])
    total = sums[0][1:-1] if sums[0].startswith("(") else sums[0]
    lines.append(f"            acc[j] += {total}")
    return "\n".join(lines) + "\n"


# -- the passes, as pass_source() writes them ---------------------------------------------------------------

@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _pass_b4_w4(qw, r, x, i, acc, j0, width, ahead):
    """acc[j] += sum of x[i + t] * code[t, j0 + j] over the 32 4-bit codes in packed rows r..r+3;
    ahead > 0: prefetch rows r+ahead.. chunk by chunk."""
    w0 = qw[r + 0, j0:j0 + width]
    w1 = qw[r + 1, j0:j0 + width]
    w2 = qw[r + 2, j0:j0 + width]
    w3 = qw[r + 3, j0:j0 + width]
    c0 = x[i + 0]
    c1_4 = x[i + 1] * np.float32(0.0625)
    c2_8 = x[i + 2] * np.float32(0.00390625)
    c3_12 = x[i + 3] * np.float32(0.000244140625)
    c4_16 = x[i + 4] * np.float32(1.52587890625e-05)
    c5_20 = x[i + 5] * np.float32(9.5367431640625e-07)
    c6_24 = x[i + 6] * np.float32(5.960464477539063e-08)
    c7_28 = x[i + 7] * np.float32(3.725290298461914e-09)
    c8 = x[i + 8]
    c9_4 = x[i + 9] * np.float32(0.0625)
    c10_8 = x[i + 10] * np.float32(0.00390625)
    c11_12 = x[i + 11] * np.float32(0.000244140625)
    c12_16 = x[i + 12] * np.float32(1.52587890625e-05)
    c13_20 = x[i + 13] * np.float32(9.5367431640625e-07)
    c14_24 = x[i + 14] * np.float32(5.960464477539063e-08)
    c15_28 = x[i + 15] * np.float32(3.725290298461914e-09)
    c16 = x[i + 16]
    c17_4 = x[i + 17] * np.float32(0.0625)
    c18_8 = x[i + 18] * np.float32(0.00390625)
    c19_12 = x[i + 19] * np.float32(0.000244140625)
    c20_16 = x[i + 20] * np.float32(1.52587890625e-05)
    c21_20 = x[i + 21] * np.float32(9.5367431640625e-07)
    c22_24 = x[i + 22] * np.float32(5.960464477539063e-08)
    c23_28 = x[i + 23] * np.float32(3.725290298461914e-09)
    c24 = x[i + 24]
    c25_4 = x[i + 25] * np.float32(0.0625)
    c26_8 = x[i + 26] * np.float32(0.00390625)
    c27_12 = x[i + 27] * np.float32(0.000244140625)
    c28_16 = x[i + 28] * np.float32(1.52587890625e-05)
    c29_20 = x[i + 29] * np.float32(9.5367431640625e-07)
    c30_24 = x[i + 30] * np.float32(5.960464477539063e-08)
    c31_28 = x[i + 31] * np.float32(3.725290298461914e-09)
    for k0 in range(0, width, CHUNK):
        k1 = min(width, k0 + CHUNK)
        if ahead > 0:
            for k in range(k0, k1, 16):
                prefetch_row(qw, r + ahead + 0, j0 + k)
                prefetch_row(qw, r + ahead + 1, j0 + k)
                prefetch_row(qw, r + ahead + 2, j0 + k)
                prefetch_row(qw, r + ahead + 3, j0 + k)
        for j in range(np.uint64(k0), np.uint64(k1)):
            a0 = w0[j]
            a1 = w1[j]
            a2 = w2[j]
            a3 = w3[j]
            s0 = (c0 * masked_f32(a0, 0x0000000F)
                  + c1_4 * masked_f32(a0, 0x000000F0)
                  + c2_8 * masked_f32(a0, 0x00000F00)
                  + c3_12 * masked_f32(a0, 0x0000F000))
            s1 = (c4_16 * masked_f32(a0, 0x000F0000)
                  + c5_20 * masked_f32(a0, 0x00F00000)
                  + c6_24 * masked_f32(a0, 0x0F000000)
                  + c7_28 * masked_f32(a0, 0xF0000000))
            s2 = (c8 * masked_f32(a1, 0x0000000F)
                  + c9_4 * masked_f32(a1, 0x000000F0)
                  + c10_8 * masked_f32(a1, 0x00000F00)
                  + c11_12 * masked_f32(a1, 0x0000F000))
            s3 = (c12_16 * masked_f32(a1, 0x000F0000)
                  + c13_20 * masked_f32(a1, 0x00F00000)
                  + c14_24 * masked_f32(a1, 0x0F000000)
                  + c15_28 * masked_f32(a1, 0xF0000000))
            s4 = (c16 * masked_f32(a2, 0x0000000F)
                  + c17_4 * masked_f32(a2, 0x000000F0)
                  + c18_8 * masked_f32(a2, 0x00000F00)
                  + c19_12 * masked_f32(a2, 0x0000F000))
            s5 = (c20_16 * masked_f32(a2, 0x000F0000)
                  + c21_20 * masked_f32(a2, 0x00F00000)
                  + c22_24 * masked_f32(a2, 0x0F000000)
                  + c23_28 * masked_f32(a2, 0xF0000000))
            s6 = (c24 * masked_f32(a3, 0x0000000F)
                  + c25_4 * masked_f32(a3, 0x000000F0)
                  + c26_8 * masked_f32(a3, 0x00000F00)
                  + c27_12 * masked_f32(a3, 0x0000F000))
            s7 = (c28_16 * masked_f32(a3, 0x000F0000)
                  + c29_20 * masked_f32(a3, 0x00F00000)
                  + c30_24 * masked_f32(a3, 0x0F000000)
                  + c31_28 * masked_f32(a3, 0xF0000000))
            acc[j] += ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _pass_b4_w1(qw, r, x, i, acc, j0, width, ahead):
    """acc[j] += sum of x[i + t] * code[t, j0 + j] over the 8 4-bit codes in packed rows r..r+0;
    ahead > 0: prefetch rows r+ahead.. chunk by chunk."""
    w0 = qw[r + 0, j0:j0 + width]
    c0 = x[i + 0]
    c1_4 = x[i + 1] * np.float32(0.0625)
    c2_8 = x[i + 2] * np.float32(0.00390625)
    c3_12 = x[i + 3] * np.float32(0.000244140625)
    c4_16 = x[i + 4] * np.float32(1.52587890625e-05)
    c5_20 = x[i + 5] * np.float32(9.5367431640625e-07)
    c6_24 = x[i + 6] * np.float32(5.960464477539063e-08)
    c7_28 = x[i + 7] * np.float32(3.725290298461914e-09)
    for k0 in range(0, width, CHUNK):
        k1 = min(width, k0 + CHUNK)
        if ahead > 0:
            for k in range(k0, k1, 16):
                prefetch_row(qw, r + ahead + 0, j0 + k)
        for j in range(np.uint64(k0), np.uint64(k1)):
            a0 = w0[j]
            s0 = (c0 * masked_f32(a0, 0x0000000F)
                  + c1_4 * masked_f32(a0, 0x000000F0)
                  + c2_8 * masked_f32(a0, 0x00000F00)
                  + c3_12 * masked_f32(a0, 0x0000F000))
            s1 = (c4_16 * masked_f32(a0, 0x000F0000)
                  + c5_20 * masked_f32(a0, 0x00F00000)
                  + c6_24 * masked_f32(a0, 0x0F000000)
                  + c7_28 * masked_f32(a0, 0xF0000000))
            acc[j] += s0 + s1


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _pass_b3_w3(qw, r, x, i, acc, j0, width, ahead):
    """acc[j] += sum of x[i + t] * code[t, j0 + j] over the 32 3-bit codes in packed rows r..r+2;
    ahead > 0: prefetch rows r+ahead.. chunk by chunk."""
    w0 = qw[r + 0, j0:j0 + width]
    w1 = qw[r + 1, j0:j0 + width]
    w2 = qw[r + 2, j0:j0 + width]
    c0 = x[i + 0]
    c1_3 = x[i + 1] * np.float32(0.125)
    c2_6 = x[i + 2] * np.float32(0.015625)
    c3_9 = x[i + 3] * np.float32(0.001953125)
    c4_12 = x[i + 4] * np.float32(0.000244140625)
    c5_15 = x[i + 5] * np.float32(3.0517578125e-05)
    c6_18 = x[i + 6] * np.float32(3.814697265625e-06)
    c7_21 = x[i + 7] * np.float32(4.76837158203125e-07)
    c8_24 = x[i + 8] * np.float32(5.960464477539063e-08)
    c9_27 = x[i + 9] * np.float32(7.450580596923828e-09)
    c11 = x[i + 11]
    c12_3 = x[i + 12] * np.float32(0.125)
    c13_6 = x[i + 13] * np.float32(0.015625)
    c14_9 = x[i + 14] * np.float32(0.001953125)
    c15_12 = x[i + 15] * np.float32(0.000244140625)
    c16_15 = x[i + 16] * np.float32(3.0517578125e-05)
    c17_18 = x[i + 17] * np.float32(3.814697265625e-06)
    c18_21 = x[i + 18] * np.float32(4.76837158203125e-07)
    c19_24 = x[i + 19] * np.float32(5.960464477539063e-08)
    c20_27 = x[i + 20] * np.float32(7.450580596923828e-09)
    c22 = x[i + 22]
    c23_3 = x[i + 23] * np.float32(0.125)
    c24_6 = x[i + 24] * np.float32(0.015625)
    c25_9 = x[i + 25] * np.float32(0.001953125)
    c26_12 = x[i + 26] * np.float32(0.000244140625)
    c27_15 = x[i + 27] * np.float32(3.0517578125e-05)
    c28_18 = x[i + 28] * np.float32(3.814697265625e-06)
    c29_21 = x[i + 29] * np.float32(4.76837158203125e-07)
    c30_24 = x[i + 30] * np.float32(5.960464477539063e-08)
    c31_27 = x[i + 31] * np.float32(7.450580596923828e-09)
    c10 = x[i + 10]
    c21 = x[i + 21]
    for k0 in range(0, width, CHUNK):
        k1 = min(width, k0 + CHUNK)
        if ahead > 0:
            for k in range(k0, k1, 16):
                prefetch_row(qw, r + ahead + 0, j0 + k)
                prefetch_row(qw, r + ahead + 1, j0 + k)
                prefetch_row(qw, r + ahead + 2, j0 + k)
        for j in range(np.uint64(k0), np.uint64(k1)):
            a0 = w0[j]
            a1 = w1[j]
            a2 = w2[j]
            v1 = shift_right_u32(a1, 1)
            v2 = shift_right_u32(a2, 2)
            s0 = (c0 * masked_f32(a0, 0x00000007)
                  + c1_3 * masked_f32(a0, 0x00000038)
                  + c2_6 * masked_f32(a0, 0x000001C0)
                  + c3_9 * masked_f32(a0, 0x00000E00))
            s1 = (c4_12 * masked_f32(a0, 0x00007000)
                  + c5_15 * masked_f32(a0, 0x00038000)
                  + c6_18 * masked_f32(a0, 0x001C0000)
                  + c7_21 * masked_f32(a0, 0x00E00000))
            s2 = (c8_24 * masked_f32(a0, 0x07000000)
                  + c9_27 * masked_f32(a0, 0x38000000)
                  + c11 * masked_f32(v1, 0x00000007)
                  + c12_3 * masked_f32(v1, 0x00000038))
            s3 = (c13_6 * masked_f32(v1, 0x000001C0)
                  + c14_9 * masked_f32(v1, 0x00000E00)
                  + c15_12 * masked_f32(v1, 0x00007000)
                  + c16_15 * masked_f32(v1, 0x00038000))
            s4 = (c17_18 * masked_f32(v1, 0x001C0000)
                  + c18_21 * masked_f32(v1, 0x00E00000)
                  + c19_24 * masked_f32(v1, 0x07000000)
                  + c20_27 * masked_f32(v1, 0x38000000))
            s5 = (c22 * masked_f32(v2, 0x00000007)
                  + c23_3 * masked_f32(v2, 0x00000038)
                  + c24_6 * masked_f32(v2, 0x000001C0)
                  + c25_9 * masked_f32(v2, 0x00000E00))
            s6 = (c26_12 * masked_f32(v2, 0x00007000)
                  + c27_15 * masked_f32(v2, 0x00038000)
                  + c28_18 * masked_f32(v2, 0x001C0000)
                  + c29_21 * masked_f32(v2, 0x00E00000))
            s7 = (c30_24 * masked_f32(v2, 0x07000000)
                  + c31_27 * masked_f32(v2, 0x38000000)
                  + c10 * funnel_f32(a0, a1, 30, 7)
                  + c21 * funnel_f32(a1, a2, 31, 7))
            acc[j] += ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _pass_b2_w2(qw, r, x, i, acc, j0, width, ahead):
    """acc[j] += sum of x[i + t] * code[t, j0 + j] over the 32 2-bit codes in packed rows r..r+1;
    ahead > 0: prefetch rows r+ahead.. chunk by chunk."""
    w0 = qw[r + 0, j0:j0 + width]
    w1 = qw[r + 1, j0:j0 + width]
    c0 = x[i + 0]
    c1_2 = x[i + 1] * np.float32(0.25)
    c2_4 = x[i + 2] * np.float32(0.0625)
    c3_6 = x[i + 3] * np.float32(0.015625)
    c4_8 = x[i + 4] * np.float32(0.00390625)
    c5_10 = x[i + 5] * np.float32(0.0009765625)
    c6_12 = x[i + 6] * np.float32(0.000244140625)
    c7_14 = x[i + 7] * np.float32(6.103515625e-05)
    c8_16 = x[i + 8] * np.float32(1.52587890625e-05)
    c9_18 = x[i + 9] * np.float32(3.814697265625e-06)
    c10_20 = x[i + 10] * np.float32(9.5367431640625e-07)
    c11_22 = x[i + 11] * np.float32(2.384185791015625e-07)
    c12_24 = x[i + 12] * np.float32(5.960464477539063e-08)
    c13_26 = x[i + 13] * np.float32(1.4901161193847656e-08)
    c14_28 = x[i + 14] * np.float32(3.725290298461914e-09)
    c15_30 = x[i + 15] * np.float32(9.313225746154785e-10)
    c16 = x[i + 16]
    c17_2 = x[i + 17] * np.float32(0.25)
    c18_4 = x[i + 18] * np.float32(0.0625)
    c19_6 = x[i + 19] * np.float32(0.015625)
    c20_8 = x[i + 20] * np.float32(0.00390625)
    c21_10 = x[i + 21] * np.float32(0.0009765625)
    c22_12 = x[i + 22] * np.float32(0.000244140625)
    c23_14 = x[i + 23] * np.float32(6.103515625e-05)
    c24_16 = x[i + 24] * np.float32(1.52587890625e-05)
    c25_18 = x[i + 25] * np.float32(3.814697265625e-06)
    c26_20 = x[i + 26] * np.float32(9.5367431640625e-07)
    c27_22 = x[i + 27] * np.float32(2.384185791015625e-07)
    c28_24 = x[i + 28] * np.float32(5.960464477539063e-08)
    c29_26 = x[i + 29] * np.float32(1.4901161193847656e-08)
    c30_28 = x[i + 30] * np.float32(3.725290298461914e-09)
    c31_30 = x[i + 31] * np.float32(9.313225746154785e-10)
    for k0 in range(0, width, CHUNK):
        k1 = min(width, k0 + CHUNK)
        if ahead > 0:
            for k in range(k0, k1, 16):
                prefetch_row(qw, r + ahead + 0, j0 + k)
                prefetch_row(qw, r + ahead + 1, j0 + k)
        for j in range(np.uint64(k0), np.uint64(k1)):
            a0 = w0[j]
            a1 = w1[j]
            s0 = (c0 * masked_f32(a0, 0x00000003)
                  + c1_2 * masked_f32(a0, 0x0000000C)
                  + c2_4 * masked_f32(a0, 0x00000030)
                  + c3_6 * masked_f32(a0, 0x000000C0))
            s1 = (c4_8 * masked_f32(a0, 0x00000300)
                  + c5_10 * masked_f32(a0, 0x00000C00)
                  + c6_12 * masked_f32(a0, 0x00003000)
                  + c7_14 * masked_f32(a0, 0x0000C000))
            s2 = (c8_16 * masked_f32(a0, 0x00030000)
                  + c9_18 * masked_f32(a0, 0x000C0000)
                  + c10_20 * masked_f32(a0, 0x00300000)
                  + c11_22 * masked_f32(a0, 0x00C00000))
            s3 = (c12_24 * masked_f32(a0, 0x03000000)
                  + c13_26 * masked_f32(a0, 0x0C000000)
                  + c14_28 * masked_f32(a0, 0x30000000)
                  + c15_30 * masked_f32(a0, 0xC0000000))
            s4 = (c16 * masked_f32(a1, 0x00000003)
                  + c17_2 * masked_f32(a1, 0x0000000C)
                  + c18_4 * masked_f32(a1, 0x00000030)
                  + c19_6 * masked_f32(a1, 0x000000C0))
            s5 = (c20_8 * masked_f32(a1, 0x00000300)
                  + c21_10 * masked_f32(a1, 0x00000C00)
                  + c22_12 * masked_f32(a1, 0x00003000)
                  + c23_14 * masked_f32(a1, 0x0000C000))
            s6 = (c24_16 * masked_f32(a1, 0x00030000)
                  + c25_18 * masked_f32(a1, 0x000C0000)
                  + c26_20 * masked_f32(a1, 0x00300000)
                  + c27_22 * masked_f32(a1, 0x00C00000))
            s7 = (c28_24 * masked_f32(a1, 0x03000000)
                  + c29_26 * masked_f32(a1, 0x0C000000)
                  + c30_28 * masked_f32(a1, 0x30000000)
                  + c31_30 * masked_f32(a1, 0xC0000000))
            acc[j] += ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _pass_b2_w1(qw, r, x, i, acc, j0, width, ahead):
    """acc[j] += sum of x[i + t] * code[t, j0 + j] over the 16 2-bit codes in packed rows r..r+0;
    ahead > 0: prefetch rows r+ahead.. chunk by chunk."""
    w0 = qw[r + 0, j0:j0 + width]
    c0 = x[i + 0]
    c1_2 = x[i + 1] * np.float32(0.25)
    c2_4 = x[i + 2] * np.float32(0.0625)
    c3_6 = x[i + 3] * np.float32(0.015625)
    c4_8 = x[i + 4] * np.float32(0.00390625)
    c5_10 = x[i + 5] * np.float32(0.0009765625)
    c6_12 = x[i + 6] * np.float32(0.000244140625)
    c7_14 = x[i + 7] * np.float32(6.103515625e-05)
    c8_16 = x[i + 8] * np.float32(1.52587890625e-05)
    c9_18 = x[i + 9] * np.float32(3.814697265625e-06)
    c10_20 = x[i + 10] * np.float32(9.5367431640625e-07)
    c11_22 = x[i + 11] * np.float32(2.384185791015625e-07)
    c12_24 = x[i + 12] * np.float32(5.960464477539063e-08)
    c13_26 = x[i + 13] * np.float32(1.4901161193847656e-08)
    c14_28 = x[i + 14] * np.float32(3.725290298461914e-09)
    c15_30 = x[i + 15] * np.float32(9.313225746154785e-10)
    for k0 in range(0, width, CHUNK):
        k1 = min(width, k0 + CHUNK)
        if ahead > 0:
            for k in range(k0, k1, 16):
                prefetch_row(qw, r + ahead + 0, j0 + k)
        for j in range(np.uint64(k0), np.uint64(k1)):
            a0 = w0[j]
            s0 = (c0 * masked_f32(a0, 0x00000003)
                  + c1_2 * masked_f32(a0, 0x0000000C)
                  + c2_4 * masked_f32(a0, 0x00000030)
                  + c3_6 * masked_f32(a0, 0x000000C0))
            s1 = (c4_8 * masked_f32(a0, 0x00000300)
                  + c5_10 * masked_f32(a0, 0x00000C00)
                  + c6_12 * masked_f32(a0, 0x00003000)
                  + c7_14 * masked_f32(a0, 0x0000C000))
            s2 = (c8_16 * masked_f32(a0, 0x00030000)
                  + c9_18 * masked_f32(a0, 0x000C0000)
                  + c10_20 * masked_f32(a0, 0x00300000)
                  + c11_22 * masked_f32(a0, 0x00C00000))
            s3 = (c12_24 * masked_f32(a0, 0x03000000)
                  + c13_26 * masked_f32(a0, 0x0C000000)
                  + c14_28 * masked_f32(a0, 0x30000000)
                  + c15_30 * masked_f32(a0, 0xC0000000))
            acc[j] += (s0 + s1) + (s2 + s3)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _pass_b8_w4(qw, r, x, i, acc, j0, width, ahead):
    """acc[j] += sum of x[i + t] * code[t, j0 + j] over the 16 8-bit codes in packed rows r..r+3;
    ahead > 0: prefetch rows r+ahead.. chunk by chunk."""
    w0 = qw[r + 0, j0:j0 + width]
    w1 = qw[r + 1, j0:j0 + width]
    w2 = qw[r + 2, j0:j0 + width]
    w3 = qw[r + 3, j0:j0 + width]
    c0 = x[i + 0]
    c1_8 = x[i + 1] * np.float32(0.00390625)
    c2_16 = x[i + 2] * np.float32(1.52587890625e-05)
    c3_24 = x[i + 3] * np.float32(5.960464477539063e-08)
    c4 = x[i + 4]
    c5_8 = x[i + 5] * np.float32(0.00390625)
    c6_16 = x[i + 6] * np.float32(1.52587890625e-05)
    c7_24 = x[i + 7] * np.float32(5.960464477539063e-08)
    c8 = x[i + 8]
    c9_8 = x[i + 9] * np.float32(0.00390625)
    c10_16 = x[i + 10] * np.float32(1.52587890625e-05)
    c11_24 = x[i + 11] * np.float32(5.960464477539063e-08)
    c12 = x[i + 12]
    c13_8 = x[i + 13] * np.float32(0.00390625)
    c14_16 = x[i + 14] * np.float32(1.52587890625e-05)
    c15_24 = x[i + 15] * np.float32(5.960464477539063e-08)
    for k0 in range(0, width, CHUNK):
        k1 = min(width, k0 + CHUNK)
        if ahead > 0:
            for k in range(k0, k1, 16):
                prefetch_row(qw, r + ahead + 0, j0 + k)
                prefetch_row(qw, r + ahead + 1, j0 + k)
                prefetch_row(qw, r + ahead + 2, j0 + k)
                prefetch_row(qw, r + ahead + 3, j0 + k)
        for j in range(np.uint64(k0), np.uint64(k1)):
            a0 = w0[j]
            a1 = w1[j]
            a2 = w2[j]
            a3 = w3[j]
            s0 = (c0 * masked_f32(a0, 0x000000FF)
                  + c1_8 * masked_f32(a0, 0x0000FF00)
                  + c2_16 * masked_f32(a0, 0x00FF0000)
                  + c3_24 * masked_f32(a0, 0xFF000000))
            s1 = (c4 * masked_f32(a1, 0x000000FF)
                  + c5_8 * masked_f32(a1, 0x0000FF00)
                  + c6_16 * masked_f32(a1, 0x00FF0000)
                  + c7_24 * masked_f32(a1, 0xFF000000))
            s2 = (c8 * masked_f32(a2, 0x000000FF)
                  + c9_8 * masked_f32(a2, 0x0000FF00)
                  + c10_16 * masked_f32(a2, 0x00FF0000)
                  + c11_24 * masked_f32(a2, 0xFF000000))
            s3 = (c12 * masked_f32(a3, 0x000000FF)
                  + c13_8 * masked_f32(a3, 0x0000FF00)
                  + c14_16 * masked_f32(a3, 0x00FF0000)
                  + c15_24 * masked_f32(a3, 0xFF000000))
            acc[j] += (s0 + s1) + (s2 + s3)


@njit(fastmath=PASS_MATH, error_model="numpy", cache=True, boundscheck=False)
def _pass_b8_w1(qw, r, x, i, acc, j0, width, ahead):
    """acc[j] += sum of x[i + t] * code[t, j0 + j] over the 4 8-bit codes in packed rows r..r+0;
    ahead > 0: prefetch rows r+ahead.. chunk by chunk."""
    w0 = qw[r + 0, j0:j0 + width]
    c0 = x[i + 0]
    c1_8 = x[i + 1] * np.float32(0.00390625)
    c2_16 = x[i + 2] * np.float32(1.52587890625e-05)
    c3_24 = x[i + 3] * np.float32(5.960464477539063e-08)
    for k0 in range(0, width, CHUNK):
        k1 = min(width, k0 + CHUNK)
        if ahead > 0:
            for k in range(k0, k1, 16):
                prefetch_row(qw, r + ahead + 0, j0 + k)
        for j in range(np.uint64(k0), np.uint64(k1)):
            a0 = w0[j]
            s0 = (c0 * masked_f32(a0, 0x000000FF)
                  + c1_8 * masked_f32(a0, 0x0000FF00)
                  + c2_16 * masked_f32(a0, 0x00FF0000)
                  + c3_24 * masked_f32(a0, 0xFF000000))
            acc[j] += s0
