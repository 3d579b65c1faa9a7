"""A progress line on stderr: shown only on a terminal, never with --quiet, never on stdout.

The one progress reporter of the project: synth (bytes written), quantize (linears of a layer), perplexity and
scoring (tokens, items) all draw their line with it.
"""

import sys
import time

from .memory import human


class Progress:
    """`label [#####.....] done/total unit (pct%) rate, eta left`, redrawn in place with a carriage return.

    label: what is being done (may be changed between updates, e.g. the file being written).
    unit: "B" shows counts and rates as bytes ("12.3 MB"), anything else as plain numbers.
    enabled: False (--quiet) draws nothing at all; a stream that is not a terminal gets only close(summary).
    stream: where to draw (sys.stderr at construction time by default).
    width: characters of the bar; every: the least seconds between redraws (the last update always draws).
    """

    def __init__(self, label, total=None, enabled=True, unit="it", stream=None, width=24, every=0.0):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.wanted = enabled                   # not quiet: a closing summary line is written even off a tty
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width, self.every = width, every
        self.start = time.perf_counter()
        self.last = float("-inf")
        self.done = 0

    def _amount(self, n):
        return human(n) if self.unit == "B" else (f"{n:.2f}" if isinstance(n, float) else f"{n}")

    def _bar(self):
        filled = min(self.width, int(self.width * self.done / self.total)) if self.total else 0
        return "[" + "#" * filled + "." * (self.width - filled) + "]"

    def line(self, note=""):
        """The current state as one line of text (without the carriage return)."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / seconds
        unit = "" if self.unit == "B" else f" {self.unit}"
        note = f"{note} " if note else ""
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            return (f"{self.label} {self._bar()} {note}{self._amount(self.done)}/{self._amount(self.total)}{unit} "
                    f"({100 * self.done / self.total:.0f}%) {self._amount(rate)}{unit}/s, {eta:.0f} s left")
        return f"{self.label} {note}{self._amount(self.done)}{unit} ({self._amount(rate)}{unit}/s)"

    def update(self, done, total=None, note=""):
        """Record `done` (of `total`, if it changed) and redraw; `note` is shown after the bar (e.g. a stage)."""
        self.done, self.total = done, total or self.total
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < self.every and not (self.total and done >= self.total):
            return
        self.last = now
        self.stream.write("\r" + self.line(note)[:160])
        self.stream.flush()

    def close(self, summary=None):
        """End the line. With a summary, leave `label [bar] summary` as a permanent line, on a terminal or not
        (unless quiet): what a log of a long run should keep."""
        if summary is not None and self.wanted:
            seconds = time.perf_counter() - self.start
            self.stream.write(("\r" if self.enabled else "") + f"{self.label} {self._bar()} {summary} "
                              f"({seconds:.1f} s)\n")
            self.stream.flush()
        elif self.enabled:
            self.stream.write("\n")
            self.stream.flush()
