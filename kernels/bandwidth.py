"""The kernel that measures memory read bandwidth: a parallel sum over a large array, so that every core
streams its share (tinyllama_ref/measure/bandwidth.py times it; benchmarks report their GB/s beside it)."""

from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def parallel_sum(a):
    """sum(a) over all threads; fastmath lets LLVM keep several partial sums, so the loads are the limit."""
    total = 0.0
    for i in prange(a.size):
        total += a[i]
    return total
