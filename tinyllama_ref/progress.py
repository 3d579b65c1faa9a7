"""A progress line on stderr: shown only on a terminal, never with --quiet, never on stdout."""

import sys
import time


class Progress:
    def __init__(self, label, total=None, enabled=True, unit="it"):
        self.label, self.total, self.unit = label, total, unit
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.done = 0

    def update(self, done, total=None):
        self.done, self.total = done, total or self.total
        if not self.enabled:
            return
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        if self.total:
            filled = int(24 * done / self.total)
            bar = "#" * filled + "." * (24 - filled)
            line = f"{self.label} [{bar}] {done}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s)"
        else:
            line = f"{self.label} {done} {self.unit} ({rate:.2f} {self.unit}/s)"
        sys.stderr.write("\r" + line[:160])
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
