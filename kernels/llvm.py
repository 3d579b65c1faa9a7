"""LLVM IR helpers shared by every kernel written as a Numba intrinsic, written once.

Numba has no vector types, so the inner steps that must keep accumulators in registers (the register tiles,
the integer dot products) are LLVM IR built with llvmlite. They all need the same few things: a type, a
vector of one value, a load or store at a byte address, a prefetch, and a declared intrinsic. Addresses are
int64 byte addresses (`array.ctypes.data` plus an offset), as the kernels pass them.

Target-specific intrinsics (`llvm.x86.*`) are named only by the kernels of their tier folder (avx2/, vnni/,
amx/); kernels/table.py never lets a tier call a kernel above it, and kernels/cpu.py caps what LLVM may emit.
"""

from llvmlite import ir
from numba.core import cgutils

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()
I8P = I8.as_pointer()


def vec(elem, n):
    """The LLVM vector type <n x elem>."""
    return ir.VectorType(elem, n)


def declare(module, name, ret, args):
    """The function `name` of type ret(args) in module, declared once."""
    return cgutils.get_or_insert_function(module, ir.FunctionType(ret or ir.VoidType(), args), name)


def call(builder, name, args, ret=None):
    """Call the intrinsic `name` with args, declaring it by the arguments' types (ret None: void)."""
    return builder.call(declare(builder.module, name, ret, [a.type for a in args]), args)


def splat(builder, value, vty):
    """A vector of type vty with every lane equal to value (a broadcast)."""
    undef = ir.Constant(vty, ir.Undefined)
    one = builder.insert_element(undef, value, I32(0))
    return builder.shuffle_vector(one, undef, ir.Constant(vec(I32, vty.count), [0] * vty.count))


def pointer(builder, addr, ty):
    """An int64 byte address as a pointer to ty."""
    return builder.inttoptr(addr, ty.as_pointer())


def load(builder, addr, ty, align=4):
    """The value of type ty at byte address addr."""
    return builder.load(pointer(builder, addr, ty), align=align)


def store(builder, value, addr, align=4):
    """Store value at byte address addr."""
    builder.store(value, pointer(builder, addr, value.type), align=align)


def offset(builder, addr, nbytes):
    """addr + nbytes (nbytes an int or an i64 value)."""
    return builder.add(addr, I64(nbytes) if isinstance(nbytes, int) else nbytes)


def prefetch(builder, addr):
    """Ask for the cache line at addr (read, keep in all levels, data): a hint that never faults."""
    fn = declare(builder.module, "llvm.prefetch.p0i8", None, [I8P, I32, I32, I32])
    builder.call(fn, [builder.inttoptr(addr, I8P), I32(0), I32(3), I32(1)])


def sum_loop(builder, n, count, vty, body, name="loop"):
    """for i in 0 .. n - 1: accs = body(i, accs), `count` accumulators of type vty starting at zero, as an LLVM
    loop that keeps them in phi nodes (so in registers, where a Numba loop around an intrinsic would send them
    through memory each step). Returns the final accumulators (zero when n <= 0) with the builder after the
    loop. body(i, accs) emits one step for the i64 counter i and returns the new accumulators."""
    zero = _const(vty, 0.0)
    pre = builder.block
    loop = builder.append_basic_block(name)
    after = builder.append_basic_block(name + "_done")
    builder.cbranch(builder.icmp_signed(">", n, I64(0)), loop, after)
    builder.position_at_end(loop)
    i = builder.phi(I64)
    i.add_incoming(I64(0), pre)
    accs = [builder.phi(vty) for _ in range(count)]
    for a in accs:
        a.add_incoming(zero, pre)
    new = body(i, accs)
    i_next = builder.add(i, I64(1))
    end = builder.block
    builder.cbranch(builder.icmp_signed("<", i_next, n), loop, after)
    i.add_incoming(i_next, end)
    for a, v in zip(accs, new):
        a.add_incoming(v, end)
    builder.position_at_end(after)
    done = []
    for v in new:
        d = builder.phi(vty)
        d.add_incoming(zero, pre)
        d.add_incoming(v, end)
        done.append(d)
    return done


def _const(ty, value):
    """value as a constant of ty, a scalar type or a vector of it."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [value] * ty.count)
    return ir.Constant(ty, value)


def _x86_without_f16c():
    """This process compiles for an x86 CPU without F16C (kernels/cpu.py's generic tier on x86), where LLVM
    widens half floats by calling a runtime function that Numba does not link."""
    import platform
    from .cpu import process_tier
    return platform.machine().lower() in ("x86_64", "amd64") and process_tier() == "generic"


def f16_to_f32(builder, bits):
    """IEEE half bits (i16, or a vector of i16) -> float32 (or a vector), exact for every value.

    LLVM's `fpext half` where the target converts halves itself (F16C's vcvtph2ps on x86, every aarch64);
    elsewhere integer operations: exponent and mantissa moved up 13 bits read as a float32 that is 2^-112
    of the value (subnormal halves included), times 2^112; inf and NaN keep their mantissa under an all-ones
    exponent; the sign goes back last."""
    n = bits.type.count if isinstance(bits.type, ir.VectorType) else None
    f32 = F32 if n is None else vec(F32, n)
    if not _x86_without_f16c():
        half = ir.HalfType() if n is None else vec(ir.HalfType(), n)
        return builder.fpext(builder.bitcast(bits, half), f32)
    i32 = I32 if n is None else vec(I32, n)
    h = builder.zext(bits, i32)
    sign = builder.shl(builder.and_(h, _const(i32, 0x8000)), _const(i32, 16))
    em = builder.and_(h, _const(i32, 0x7FFF))
    scaled = builder.fmul(builder.bitcast(builder.shl(em, _const(i32, 13)), f32), _const(f32, 2.0 ** 112))
    special = builder.or_(_const(i32, 0x7F800000), builder.shl(builder.and_(em, _const(i32, 0x3FF)), _const(i32, 13)))
    body = builder.select(builder.icmp_unsigned(">=", em, _const(i32, 0x7C00)), special, builder.bitcast(scaled, i32))
    return builder.bitcast(builder.or_(body, sign), f32)

