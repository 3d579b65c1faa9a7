"""Say so on stderr before a kernel compiles for the first time, and count the seconds compiling takes.

Every kernel is compiled with cache=True, so a process whose Numba cache is warm only loads machine code. A
cold cache (first run after install, after a kernel changed, or for another CPU tier: the cache keeps one
build per target CPU) compiles for 30-60 s on 2 cores, inside the first forward pass. gptq_matmul asks
before_call() about the kernels it is about to run (the table's choice, nothing else), so the note appears
exactly when one of them is about to compile, once per process. A kernel counts as cached when Numba's index
for it (kernels/**/__pycache__, or NUMBA_CACHE_DIR) holds an entry for this target CPU and this source.

compile_seconds() is the time Numba spent compiling in this process (its "numba:compile" events, outermost
only), so that benchmarks can report the first run's compile time apart from the prefill it interrupted.
"""

import sys
import time

_said = {}
_warm = set()                # ids of dispatchers already found cached, or already called, in this process
_clock = {"depth": 0, "start": 0.0, "total": 0.0}


def _magic_tuple():
    from numba.core import registry
    return registry.cpu_target.target_context.codegen().magic_tuple()


def is_cached(dispatcher):
    """Whether this dispatcher has a build at hand: compiled in this process already, or in Numba's cache for
    this target CPU and its current source."""
    if dispatcher.signatures:
        return True
    try:
        cache = dispatcher._cache
        index = cache._cache_file._load_index()               # {} when missing or stale (source changed)
        magic = _magic_tuple()
        return any(key[1] == magic for key in index)
    except (AttributeError, OSError, EOFError, ValueError):    # another Numba version: say nothing
        return True


def before_call(dispatchers, what="kernels"):
    """Print one line to stderr if a dispatcher about to run has no cached build (at most once per process)."""
    cold = [d for d in dispatchers if id(d) not in _warm and not is_cached(d)]
    _warm.update(id(d) for d in dispatchers)
    if cold and not _said:
        _said["at"] = time.perf_counter()
        names = ", ".join(getattr(d, "__name__", "?") for d in cold)
        print(f"tinyllama-ref: compiling {what} for this CPU, once (cached afterwards): about 30-60 s ({names})",
              file=sys.stderr, flush=True)


def announce_if_cold(dispatchers, what="kernels"):
    """before_call under its older name (the dense fp16/bf16 kernels use it)."""
    before_call(dispatchers, what)


def compile_seconds():
    """Seconds Numba has spent compiling in this process so far (outermost compilations only)."""
    _listen()
    return _clock["total"]


def _listen():
    if _clock.get("listening"):
        return
    from numba.core import event

    class _Timer(event.Listener):
        def on_start(self, ev):
            if _clock["depth"] == 0:
                _clock["start"] = time.perf_counter()
            _clock["depth"] += 1

        def on_end(self, ev):
            _clock["depth"] -= 1
            if _clock["depth"] == 0:
                _clock["total"] += time.perf_counter() - _clock["start"]
    event.register("numba:compile", _Timer())
    _clock["listening"] = True


_listen()
