"""How many threads a forward pass uses, chosen from how fast the last passes ran.

A decode pass shares each matmul's column blocks between the threads (kernels/gptq.py decode_bounds: blocks of a
guided schedule taken in turn where layers are in strips, one long block per thread where they are row-major).
On a quiet machine, or one where the other core is taken now and then, that is right. When another process
keeps one of the cores busy, the thread that shares it gets about half its time in whole time slices, and a
matmul waits for the block it holds: two threads then decode slower than one (measured on the 7B: 1.7 tokens/s
with two, 5.0 with one; with guided blocks, 2.15 against 3.95). So before each decode pass the
chooser looks at how many cores other processes used lately (CpuMeter: the machine's busy time in /proc/stat
minus this process's own) and leaves those to them.

Where /proc/stat cannot be read, it measures passes instead: it runs passes with the current count, now and
then runs one pass with another count (a probe), and switches when two probes in a row are clearly faster
(one fresh sample each: older ones were taken on a machine that may have changed since).

    chooser = ThreadChooser(max_threads=2)
    n = chooser.choose(kind)          # kind: passes that cost the same, e.g. ("decode", rows)
    ...run the pass with n threads...
    chooser.record(kind, n, seconds)

Probes back off: each probe that confirms the current count doubles the passes until the next one (from
PROBE_FIRST up to PROBE_MAX), so on a steady machine probing costs a fraction of a percent. When the current
count's passes get clearly slower than they were (the machine changed), probing starts again at once.
"""

import os
import statistics
import time
from collections import deque

from . import platform

PROBE_FIRST = 4          # passes before the first probe of a kind
PROBE_MAX = 64           # longest interval between probes (a quiet machine pays ~1% for them)
MARGIN = 0.10            # a probe must be this much faster (median of its samples) to switch
SLOWER = 1.25            # current passes this much slower than their best recent median: probe now
WINDOW = 5               # samples kept per (kind, thread count)
TAKEN = 0.4              # a core others use this much of counts as taken (CpuMeter)


class CpuMeter:
    """How many cores other processes kept busy lately: the machine's busy time (/proc/stat) minus this
    process's own CPU time (os.times), per second of wall time, averaged over at least INTERVAL seconds
    (the counters tick in 10 ms) and smoothed. None where /proc/stat cannot be read (not Linux)."""

    INTERVAL = 0.1
    SMOOTH = 0.5

    def __init__(self, read=None):
        self.read = read or self._read
        self.last = self.read()
        self.others = None

    @staticmethod
    def _read():
        """(seconds of busy CPU on the whole machine, seconds of CPU of this process, wall seconds) or None."""
        busy = platform.busy_cpu_seconds()             # /proc/stat; None elsewhere
        if busy is None:
            return None
        t = os.times()
        return busy, t.user + t.system, time.monotonic()

    def update(self):
        now = self.read()
        if now is None or self.last is None:
            self.last = now
            return self.others
        wall = now[2] - self.last[2]
        if wall >= self.INTERVAL:
            used = max(0.0, ((now[0] - self.last[0]) - (now[1] - self.last[1])) / wall)   # cores, others
            self.others = used if self.others is None else self.SMOOTH * used + (1 - self.SMOOTH) * self.others
            self.last = now
        return self.others


class ThreadChooser:
    """Thread count per kind of pass (module docstring). fixed=N always answers N (the user chose).
    meter: a CpuMeter (made on first use; meter=False: probes only)."""

    def __init__(self, max_threads, fixed=None, meter=None):
        self._max = max_threads          # an int, or a function that says it on first use
        self.fixed = fixed
        self.state = {}
        self.meter = meter

    @property
    def max_threads(self):
        if callable(self._max):
            self._max = self._max()
        return max(1, int(self._max))

    def _kind(self, kind):
        if kind not in self.state:
            self.state[kind] = {"current": self.max_threads, "samples": {}, "best": None,
                                "interval": PROBE_FIRST, "until_probe": PROBE_FIRST, "probing": None,
                                "agreed": False}
        return self.state[kind]

    def candidates(self):
        return [1, self.max_threads] if self.max_threads > 1 else [1]

    def choose(self, kind):
        """The thread count for the next pass of this kind (None: a pass that always uses them all)."""
        top = self.max_threads                       # (checks a fixed count against the machine)
        if self.fixed is not None:
            return self.fixed
        if kind is None or top == 1:
            return top
        if self.meter is None:
            self.meter = CpuMeter()
        others = self.meter.update() if self.meter else None
        if others is not None:
            # Cores other processes hold, measured: leave them those (a core counts as taken from
            # TAKEN of its time on), the rest of the cores for this pass.
            n = max(1, min(top, int(top - others + (1 - TAKEN))))
            self._kind(kind)["last"] = n
            return n
        s = self._kind(kind)
        if s["until_probe"] <= 0:
            s["probing"] = next(n for n in self.candidates() if n != s["current"])
            return s["probing"]
        return s["current"]

    def record(self, kind, threads, seconds):
        if self.fixed is not None or self.max_threads == 1:
            return
        s = self._kind(kind)
        window = s["samples"].setdefault(threads, deque(maxlen=WINDOW))
        window.append(seconds)
        if s["probing"] is not None and threads == s["probing"]:
            s["probing"] = None
            here = statistics.median(s["samples"].get(s["current"], [seconds]))
            if seconds < here * (1 - MARGIN):        # faster: switch once a second probe in a row agrees
                if s["agreed"]:
                    s["current"], s["best"], s["agreed"] = threads, seconds, False
                    s["interval"] = PROBE_FIRST
                    self._forget_others(s)
                    s["until_probe"] = s["interval"]
                else:
                    s["agreed"] = True
                    s["until_probe"] = 0
                return
            s["agreed"] = False                      # confirmed the current count: probe less often
            s["interval"] = min(PROBE_MAX, 2 * s["interval"])
            s["until_probe"] = s["interval"]
            return
        if threads != s["current"]:
            return
        s["until_probe"] -= 1
        recent = statistics.median(window)
        if len(window) >= 3:
            if s["best"] is None or recent < s["best"]:
                s["best"] = recent
            elif recent > SLOWER * s["best"]:        # the machine changed: look again soon
                s["best"] = recent
                self._forget_others(s)
                s["interval"] = PROBE_FIRST
                s["until_probe"] = min(s["until_probe"], 0)

    @staticmethod
    def _forget_others(s):
        """Probe samples of the other counts were taken on a machine that has since changed."""
        for n in list(s["samples"]):
            if n != s["current"]:
                del s["samples"][n]

    def describe(self):
        if self.fixed is not None:
            return f"{self.fixed} threads (fixed)"
        def name(kind):
            return f"{kind[1]}-row {kind[0]}" if isinstance(kind, tuple) else str(kind)
        return ", ".join(f"{name(kind)}: {s.get('last', s['current'])}" for kind, s in self.state.items()) \
            or "not used yet"


ENV = "TINYLLAMA_THREADS"     # "auto" (the default) or a number; the CLI's --threads sets it


def parse_threads(value, where="threads"):
    """None/"auto" -> None (choose per pass), or a positive int: the one count to use."""
    from .errors import GenerationError
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool):
        raise GenerationError(f"{where} must be a positive number of threads or 'auto', got {value!r}")
    return n


def chooser_for(backend, threads=None):
    """The ThreadChooser of a model: threads as given to load(), else $TINYLLAMA_THREADS, else "auto". The
    numpy backend runs on one thread (plus whatever BLAS does) and gets a chooser that never changes."""
    import os
    if threads is None:
        fixed = parse_threads(os.environ.get(ENV), f"${ENV}")
    else:
        fixed = parse_threads(threads)
    if backend != "numba":
        return ThreadChooser(1, fixed=fixed)

    def numba_threads():                  # imported on the first pass, not at load (load's memory baseline)
        import numba
        top = numba.config.NUMBA_NUM_THREADS
        if fixed is not None and fixed > top:
            from .errors import GenerationError
            raise GenerationError(f"threads={fixed} is more than the {top} this machine gives Numba "
                                  f"(NUMBA_NUM_THREADS)")
        return top
    return ThreadChooser(numba_threads, fixed=fixed)


class using_threads:
    """`with using_threads(n):` the Numba kernels and slab workers launched from this thread use n threads."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        import numba
        self.before = numba.get_num_threads()
        if self.n != self.before:
            numba.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import numba
        if numba.get_num_threads() != self.before:
            numba.set_num_threads(self.before)
