"""The bandwidths every benchmark reports its figures against, measured in the same run (a shared
machine's memory and disk rates move from minute to minute): the memory's read rate over every core, and the
read rate of the disk that holds a checkpoint, uncached."""

import os
import time

import numpy as np

from ..platform import drop_cached


def memory_read_gbps(nbytes=512 * 2**20, repeats=7):
    """Median GB/s of reading a float64 array of `nbytes` once, on every thread (a parallel Numba sum)."""
    from ..kernels.bandwidth import parallel_sum
    a = np.ones(nbytes // 8, dtype=np.float64)
    parallel_sum(a[:1024])                          # compile outside the timing
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        parallel_sum(a)
        times.append(time.perf_counter() - t)
    return a.nbytes / float(np.median(times)) / 1e9


def disk_read_gbps(path, nbytes=512 * 2**20, chunk=8 * 2**20):
    """GB/s of reading up to `nbytes` of `path` after dropping those pages from the page cache (on macOS: read
    through F_NOCACHE, which does not drop pages cached before; platform.drop_cached).

    POSIX_FADV_DONTNEED only drops clean pages nobody maps, so a file this process maps may still be
    partly cached: the figure is then optimistic, and says so by being close to memory speed.
    """
    size = os.path.getsize(path)
    n = min(nbytes, size)
    start = max(0, (size - n) // 2 // 4096 * 4096)      # the middle of the file: weights, not the header
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_cached(fd, start, n)
        buf = bytearray(chunk)
        view = memoryview(buf)
        t = time.perf_counter()
        done = 0
        while done < n:
            got = os.preadv(fd, [view[:min(chunk, n - done)]], start + done)
            if got <= 0:
                break
            done += got
        seconds = time.perf_counter() - t
        drop_cached(fd, start, n)
    finally:
        os.close(fd)
    return done / seconds / 1e9 if seconds > 0 else float("inf")
