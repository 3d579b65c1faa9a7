"""Memory read bandwidth, measured the way docs/performance.md describes: a parallel Numba sum over a large array.

Benchmarks report their GB/s next to this figure taken in the same run, because a shared machine's
bandwidth moves from minute to minute.
"""

import time

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def _parallel_sum(a):
    total = 0.0
    for i in prange(a.size):
        total += a[i]
    return total


def memory_read_gbps(nbytes=512 * 2**20, repeats=7):
    """Median GB/s of reading a float64 array of `nbytes` once, over both cores."""
    a = np.ones(nbytes // 8, dtype=np.float64)
    _parallel_sum(a[:1024])                          # compile outside the timing
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _parallel_sum(a)
        times.append(time.perf_counter() - t)
    return a.nbytes / float(np.median(times)) / 1e9
