"""The integer dot product of VNNI's vpdpbusd on AVX2: vpmaddubsw into int16, vpmaddwd into int32.

VNNI's int8-mode kernels (kernels/vnni/int8.py, int8_gemm.py) add, per 32-bit lane (one column), four
products of an unsigned byte (a 4-bit code, 0..15) and a signed byte (an int8 activation piece) with one vpdpbusd. AVX2
does it in two steps:
    vpmaddubsw(codes u8, x s8) -> int16 lanes  c_2i x_2i + c_2i+1 x_2i+1      (saturating, see below)
    vpmaddwd(v, ones)          -> int32 lanes  v_2i + v_2i+1
so one lane of 32 bits gets the same four products, and because the codes are small, several vpmaddubsw
results are added in int16 before the one vpmaddwd, which is where AVX2 saves work.

Exactness bound. Codes are 0..15 and every activation byte is in [-127, 127] (the int8 mode's rounded x).
One vpmaddubsw lane is then at most 2 * 15 * 127 = 3810 in magnitude, far from the int16 saturation at
32767 (no saturation, so the lane is the exact sum). A block of 32 inputs is 4 packed words, each split into its even and odd nibbles: 8 vpmaddubsw
results per lane, at most 8 * 3810 = 30480 <= 32767, so their int16 sum (vpaddw, which wraps) is exact.
vpmaddwd then adds two such lanes into int32: at most 60960, exact. The int32 sums are therefore exactly the
vpdpbusd sums over the same block, whatever the order of the additions.

dot_block() emits that for one block of 4 packed rows and 16 columns, as LLVM IR (Numba has no vector
types); the callers fold the int32 sums exactly as the VNNI kernels do.
"""

from llvmlite import ir

from .. import llvm
from ..llvm import I8, I16, I32, vec

V8I = vec(I32, 8)                 # one ymm of int32: 8 columns
V32B = vec(I8, 32)                # the same register as 32 bytes: 4 codes (or activations) per column
V16S = vec(I16, 16)               # the same register as 16 int16 pair sums
MADDUBS = "llvm.x86.avx2.pmadd.ub.sw"     # vpmaddubsw ymm
MADDWD = "llvm.x86.avx2.pmadd.wd"         # vpmaddwd ymm
WORDS = 4                         # packed rows per 32-input block


def code_bytes(builder, w_addr, row_bytes):
    """The 4-bit codes of one block (4 packed rows, `row_bytes` apart, from w_addr) for 8 columns as
    unsigned bytes: codes[k] = (even, odd), <32 x i8> each: `word & 0x0F0F0F0F` holds the codes of inputs
    0, 2, 4, 6 of packed row k, `(word >> 4) & 0x0F0F0F0F` those of 1, 3, 5, 7."""
    mask = ir.Constant(V8I, [0x0F0F0F0F] * 8)
    four = ir.Constant(V8I, [4] * 8)
    codes = []
    for k in range(WORDS):
        w = llvm.load(builder, builder.add(w_addr, builder.mul(row_bytes, llvm.I64(k))), V8I)
        codes.append((builder.bitcast(builder.and_(w, mask), V32B),
                      builder.bitcast(builder.and_(builder.lshr(w, four), mask), V32B)))
    return codes


def dot_block(builder, codes, x_addr, pieces):
    """int32 sums per piece (<8 x i32> each) of one block and 8 columns: for each piece p, column j,
        t_pj = sum over the block's 32 inputs i of x_pi * code_ij,
    the bytes x of piece p at x_addr + 32 p: 8 int32, two per packed row k (inputs 0, 2, 4, 6 | 1, 3, 5, 7 of
    the row, as the int8 mode's layout packs them), each broadcast to every column.

    Register budget (16 ymm): `pieces` int16 accumulators (1 for the int8 mode), the 8 code vectors of the block
    (even and odd bytes of 4 packed rows, code_bytes: decoded once, then reused by every row of a batch),
    2 broadcast activation words: 11. The callers run the two halves of 16 columns one after the other: both
    at once would need 16 code vectors."""
    sums = [None] * pieces
    for k in range(WORDS):
        even, odd = codes[k]
        for p in range(pieces):
            xe = llvm.load(builder, llvm.offset(builder, x_addr, 32 * p + 8 * k), I32)
            xo = llvm.load(builder, llvm.offset(builder, x_addr, 32 * p + 8 * k + 4), I32)
            both = builder.add(llvm.call(builder, MADDUBS, [even, builder.bitcast(llvm.splat(builder, xe, V8I), V32B)],
                                         V16S),
                               llvm.call(builder, MADDUBS, [odd, builder.bitcast(llvm.splat(builder, xo, V8I), V32B)],
                                         V16S))                                 # |lane| <= 2 * 3810
            sums[p] = both if sums[p] is None else builder.add(sums[p], both)   # |lane| <= 8 * 3810 = 30480
    ones = ir.Constant(V16S, [1] * 16)
    return [llvm.call(builder, MADDWD, [sums[p], ones], V8I) for p in range(pieces)]


def dot_strip(builder, w_addr, row_bytes, x_addr, vecs):
    """dot_block's int32 sums (one row, one piece) for `vecs` x 8 side-by-side columns, in the order that fits
    16 registers when the columns are many: packed row by packed row, each row's two activation words broadcast
    once and its codes decoded just before their two vpmaddubsw, into one int16 sum per 8 columns. Live: `vecs`
    int16 sums, 2 activation words, 2 code vectors (dot_block over the columns one 8 after another would keep
    each block's 8 activation words, and LLVM spilled). The integer sums are dot_block's exactly (int16 and
    int32 additions are exact within maddubs.py's bound, in any order)."""
    mask = ir.Constant(V8I, [0x0F0F0F0F] * 8)
    four = ir.Constant(V8I, [4] * 8)
    sums = [None] * vecs
    for k in range(WORDS):
        xe = builder.bitcast(llvm.splat(builder, llvm.load(builder, llvm.offset(builder, x_addr, 8 * k), I32), V8I),
                             V32B)
        xo = builder.bitcast(llvm.splat(builder, llvm.load(builder, llvm.offset(builder, x_addr, 8 * k + 4), I32),
                                        V8I), V32B)
        row = builder.add(w_addr, builder.mul(row_bytes, llvm.I64(k)))
        for c in range(vecs):
            w = llvm.load(builder, llvm.offset(builder, row, 32 * c), V8I)
            even = builder.bitcast(builder.and_(w, mask), V32B)
            odd = builder.bitcast(builder.and_(builder.lshr(w, four), mask), V32B)
            both = builder.add(llvm.call(builder, MADDUBS, [even, xe], V16S),
                               llvm.call(builder, MADDUBS, [odd, xo], V16S))
            sums[c] = both if sums[c] is None else builder.add(sums[c], both)
    ones = ir.Constant(V16S, [1] * 16)
    return [llvm.call(builder, MADDWD, [sums[c], ones], V8I) for c in range(vecs)]
