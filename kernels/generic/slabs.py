"""Many-row matmuls as independent column slabs: each thread widens its own slab and multiplies it with BLAS.

Used by the prefill paths of gptq.py and half.py: y[:, j0:j1] = x @ (slab of W, made float32 on the fly).

Why not "Numba-parallel dequantize, then multi-threaded BLAS", slab after slab? Every such step is a barrier
for both thread pools, and on a shared 2-core machine one preempted thread stalls the whole step for a
scheduler tick: measured 10x slower than the same work done as below. Here each of our threads runs a
single-threaded widen (Numba, GIL released) followed by a single-threaded BLAS call (NumPy, GIL released) on
its own slabs, so the threads meet only once, at the end. BLAS is held to one thread for the duration
through OpenBLAS's own set_num_threads, found in the loaded library; where it cannot be found, the slabs run
one after the other with BLAS's default threads instead.
"""

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numba

_lock = threading.Lock()
_openblas = {}
_pool = {}


def _find_openblas():
    """(get, set) for the OpenBLAS that NumPy loaded, or None (other BLAS, other OS)."""
    if "api" in _openblas:
        return _openblas["api"]
    api = None
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
        for path in paths:
            lib = ctypes.CDLL(path)
            for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"),
                                   ("openblas_", "")):
                get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype = ctypes.c_int
                    put.argtypes = [ctypes.c_int]
                    api = (get, put)
                    break
            if api:
                break
    except OSError:
        api = None
    _openblas["api"] = api
    return api


@contextmanager
def single_threaded_blas():
    """Hold NumPy's OpenBLAS to one thread inside the block; yields False if that is not possible."""
    import numpy  # noqa: F401,F811  (NumPy's BLAS must be loaded before we look for it)
    api = _find_openblas()
    if api is None:
        yield False
        return
    get, put = api
    with _lock:
        before = get()
        put(1)
        try:
            yield True
        finally:
            put(before)


def _executor(n):
    if n not in _pool:
        _pool[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="tinyllama-slab")
    return _pool[n]


def run_slabs(n_out, columns, work):
    """Call work(j0, j1, worker) for every slab [j0, j1) of `columns` output columns; worker (0..T-1) names
    the thread, so work can keep one scratch tile per thread."""
    starts = list(range(0, n_out, columns))
    threads = min(numba.get_num_threads(), len(starts))
    with single_threaded_blas() as ok:
        if not ok or threads <= 1:
            for j0 in starts:
                work(j0, min(n_out, j0 + columns), 0)
            return

        todo = iter(starts)
        take = threading.Lock()

        def lane(worker):
            while True:                 # take the next slab: a thread the OS delays simply does fewer
                with take:
                    j0 = next(todo, None)
                if j0 is None:
                    return
                work(j0, min(n_out, j0 + columns), worker)
        futures = [_executor(threads).submit(lane, w) for w in range(threads)]
        for fut in futures:
            fut.result()


def run_row_blocks(n_rows, work, tasks_per_thread=4):
    """Call work(r0, r1) for blocks of rows [r0, r1) spread over the threads, a few blocks per thread so a
    thread the OS delays simply takes fewer (NumPy releases the GIL inside its element-wise loops, so NumPy
    code on disjoint rows runs on both cores). For the element-wise steps between the matmuls: RMSNorm, RoPE,
    SiLU (tinyllama_ref/ops.py) and attention heads (tinyllama_ref/attention.py)."""
    threads = max(1, numba.get_num_threads())
    block = max(1, -(-n_rows // (threads * tasks_per_thread)))
    run_slabs(n_rows, block, lambda r0, r1, worker: work(r0, r1))
