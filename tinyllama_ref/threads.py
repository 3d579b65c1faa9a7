"""How many threads a forward pass uses, chosen from how fast the last passes ran.

A decode pass splits each matmul statically over the threads (kernels/gptq_gemv.py: one long column block
per thread streams best). On a quiet machine that is right. When another process keeps one of the cores busy,
the thread that shares it gets about half its time and every matmul waits for it: two threads then decode
slower than one. Which is better depends on what the rest of the machine does right now, which no file in
/proc says reliably, so the chooser measures it: it runs passes with the current count, now and then runs
one pass with another count (a probe), and switches when two probes in a row are clearly faster (one fresh
sample each: older ones were taken on a machine that may have changed since).

    chooser = ThreadChooser(max_threads=2)
    n = chooser.choose(kind)          # kind: passes that cost the same, e.g. ("decode", rows)
    ...run the pass with n threads...
    chooser.record(kind, n, seconds)

Probes back off: each probe that confirms the current count doubles the passes until the next one (from
PROBE_FIRST up to PROBE_MAX), so on a steady machine probing costs a fraction of a percent. When the current
count's passes get clearly slower than they were (the machine changed), probing starts again at once.
"""

import statistics
from collections import deque

PROBE_FIRST = 4          # passes before the first probe of a kind
PROBE_MAX = 64           # longest interval between probes (a quiet machine pays ~1% for them)
MARGIN = 0.10            # a probe must be this much faster (median of its samples) to switch
SLOWER = 1.25            # current passes this much slower than their best recent median: probe now
WINDOW = 5               # samples kept per (kind, thread count)


class ThreadChooser:
    """Thread count per kind of pass (module docstring). fixed=N always answers N (the user chose)."""

    def __init__(self, max_threads, fixed=None):
        self._max = max_threads          # an int, or a function that says it on first use
        self.fixed = fixed
        self.state = {}

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
        return ", ".join(f"{name(kind)}: {s['current']}" for kind, s in self.state.items()) or "not used yet"


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
