"""Timing probe for the CPU model: is a multiply with a subnormal operand as fast as one without?

AMD's Zen cores multiply subnormal float32 operands at full speed; Intel's cores hand such an operation to a
microcode assist of about a hundred cycles (unless the thread's MXCSR has DAZ set, and then the operand reads
as zero). avx2/gemv.py has a decode that feeds the packed codes to the FMAs as subnormal floats, with no
conversion instruction, so it is worth taking only where the first holds: kernels/cpu.py asks this probe
once per process (cpu.fast_subnormals). The kernel's results are the same bits either way, so the probe only
chooses a speed.

NumPy statement: y = x * d + y over float32 arrays, once with d normal and once with d subnormal.
"""

import time

import numpy as np
from numba import njit

N = 2048            # floats per array: 8 KB each, in L1
REPS = 64           # passes per timing: about 20 us where subnormals are free, a few ms where they are not
SLOWER = 2.0        # subnormal operands count as fast below this ratio of times (a microcode assist is ~50x)


@njit(cache=True, error_model="numpy", boundscheck=False)
def _multiply_add(x, d, y, reps):
    """y = x * d + y, reps times over the arrays (independent lanes: LLVM vectorises it)."""
    for _ in range(reps):
        for i in range(x.shape[0]):
            y[i] = x[i] * d[i] + y[i]


def _best_time(x, d, rounds=5):
    y = np.zeros_like(x)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        _multiply_add(x, d, y, REPS)
        best = min(best, time.perf_counter() - t)
    return best


def subnormal_operands_fast():
    """True when multiplies with subnormal operands run within SLOWER of normal ones on this thread (the
    products are normal, ~1e-10, as in the decode)."""
    x = np.full(N, 1e30, dtype=np.float32)
    normal = np.full(N, 1e-38, dtype=np.float32) * np.float32(1e3)            # 1e-35, normal
    tiny = np.full(N, 1e-40, dtype=np.float32)                                  # subnormal
    _multiply_add(x[:8], normal[:8], np.zeros(8, dtype=np.float32), 1)          # compiled (or loaded) first
    return _best_time(x, tiny) < SLOWER * _best_time(x, normal)
