"""Say so on stderr, once, before the kernels compile for the first time (instead of a silent first pass).

Every kernel is compiled with cache=True, so a process whose Numba cache is warm only loads machine code
(~1 s, most of it importing Numba). A cold cache (first run after install or after a kernel changed) compiles
for about 30-60 s on 2 cores, inside the first forward pass: the note tells the user why, and that it happens
once. A kernel counts as cached when Numba's index file for it exists (where Numba's own cache locator puts
it: kernels/__pycache__, or NUMBA_CACHE_DIR).
"""

import os
import sys
import time

_said = {}


def _is_cached(dispatcher):
    try:
        return os.path.exists(dispatcher._cache._cache_file._index_path)
    except AttributeError:           # another Numba version: say nothing rather than guess
        return True


def announce_if_cold(dispatchers, what="kernels"):
    """Print one line to stderr if any of the dispatchers has no cache yet (once per process)."""
    if _said or all(_is_cached(d) for d in dispatchers):
        return
    _said["at"] = time.perf_counter()
    print(f"tinyllama-ref: compiling {what}, once (cached afterwards): about 30-60 s", file=sys.stderr,
          flush=True)
