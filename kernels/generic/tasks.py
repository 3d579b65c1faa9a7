"""Column blocks handed out while a decode GEMV runs: a guided schedule and an atomic counter.

A one-row GEMV reads its layer once and is done in a fraction of a millisecond. Split statically, each of T
threads gets n_out / T columns and the call ends when the slowest thread does; on a shared host a thread
loses its core now and then, and the other one waits idle. Here the threads take blocks in turn instead:

    bounds = guided(n_out, unit, T)          # [0, b_1, ..., n_out], each block about 1/(2T) of what remains
    every thread:  while (b := counter++) < len(bounds) - 1:  compute columns bounds[b] .. bounds[b + 1]

This is for layers stored in column strips (strips.py), where a block of any width is one run of memory: the
first blocks are long (the hardware prefetchers follow long runs) and the last ones one unit wide, so two
threads that both run finish within a unit of each other, and a thread that lost its core for a while simply
takes fewer blocks. Which thread computes a column changes nothing in its arithmetic, so the results are the
same bits as with any split.

Measured on the 7B shape (exact one-row decode, capped AVX2 on Zen 4, 2 threads, paired medians of rounds
alternating with the static split in one process): a token took 0.83-0.87x the time while a process used 20%
of the other core, 0.94-0.99x on the shared host alone, and the same time on one thread. A core that another
process keeps fully busy is still better left alone: the thread on it holds its block for a whole time slice
(threads.py chooses one thread then). A row-major layer reads each packed row in runs as long as the block, so
there each thread takes one block (gptq.decode_bounds: uniform): guided blocks made split8 1.2x slower.
"""

import functools

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from ..llvm import I64


@functools.lru_cache(maxsize=256)
def guided(n_out, unit, threads):
    """Column bounds [n_blocks + 1] int64 of a guided schedule: blocks of whole units (the last one may be
    shorter: it ends at n_out), each about remaining / (2 * threads); one block for one thread."""
    bounds = [0]
    while bounds[-1] < n_out:
        left = n_out - bounds[-1]
        size = left if threads <= 1 else max(unit, -(-left // (2 * threads * unit)) * unit)
        bounds.append(min(n_out, bounds[-1] + size))
    out = np.array(bounds, dtype=np.int64)
    out.flags.writeable = False                       # shared by every call of this shape
    return out


@functools.lru_cache(maxsize=256)
def uniform(n_out, block):
    """Column bounds of blocks of `block` columns (the last one shorter): one block per thread on row-major
    layers (gptq.decode_bounds), or block edges a test places."""
    out = np.append(np.arange(0, n_out, block, dtype=np.int64), np.int64(n_out))
    out.flags.writeable = False                       # shared by every call of this shape
    return out


def as_bounds(n_out, blocks):
    """Column bounds as the kernels take them: `blocks` itself (bounds, e.g. guided's), or uniform blocks of
    that many columns for an int."""
    return uniform(n_out, blocks) if np.isscalar(blocks) else blocks


def counter():
    """A fresh task counter [1] int64 for one call (its address goes to next_block)."""
    return np.zeros(1, dtype=np.int64)


@intrinsic
def next_block(typingctx, address):
    """The counter at this byte address, incremented atomically: the old value (int64). Monotonic ordering is
    enough: the blocks write disjoint outputs, and the parallel region's end orders them for the caller."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], I64.as_pointer())
        return builder.atomic_rmw("add", pointer, I64(1), "monotonic")
    return sig, codegen


@njit(inline="always")
def take(counter, bounds):
    """The next block from the counter [1] int64: (its first column, its width), or (-1, 0) when none is left.
    A kernel's threads each run:  while True: j0, width = take(counter, bounds); if j0 < 0: break; ..."""
    b = next_block(np.int64(counter.ctypes.data))
    if b >= bounds.shape[0] - 1:
        return np.int64(-1), np.int64(0)
    return bounds[b], bounds[b + 1] - bounds[b]
