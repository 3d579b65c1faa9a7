"""Memory sizes for people ("20GB"), and what this process and this machine have right now
(platform.py: Linux /proc, and what stands for it elsewhere)."""

import math
import numbers
import re

import numpy as np

from . import platform
from .errors import MemoryBudgetError

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MAX_SIZE = 2**63 - 1     # bytes: larger budgets are typos (or infinity), not machines


def parse_size(text):
    """'20GB' -> 20_000_000_000; '1500MB', '16GiB', '123456' (bytes) also work. Anything else, including
    NaN, infinity, negative sizes, booleans and numbers too large to mean anything, is a MemoryBudgetError."""
    if isinstance(text, numbers.Real) and not isinstance(text, (bool, np.bool_)):
        value = float(text) if not isinstance(text, numbers.Integral) else int(text)
    elif isinstance(text, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
        if not m or m.group(2).upper() not in _UNITS:
            raise MemoryBudgetError(f"cannot read memory size {text!r}; write it like 20GB, 1500MB or 123456 "
                                    "(bytes)")
        value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    else:
        raise MemoryBudgetError(f"memory size must be a number of bytes or a string like 20GB, got "
                                f"{type(text).__name__} {repr(text)[:40]}")
    shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:37] + "..."
    if not math.isfinite(value):
        raise MemoryBudgetError(f"memory size must be a finite number of bytes, got {shown}")
    if value > MAX_SIZE:
        raise MemoryBudgetError(f"memory size {shown} is larger than any machine's memory (limit {MAX_SIZE} "
                                "bytes)")
    if value < 1:
        raise MemoryBudgetError(f"memory size must be positive, got {shown}")
    return int(value)


def human(n, round_up=False):
    """Bytes for people, in SI units with one decimal: 36_700_000_000 -> "36.7 GB", 999 -> "999 B".

    The one byte formatter of the project (budgets, file sizes, transfer rates); parse_size reads it back.
    round_up: for a minimum the user should give (a budget), never print less than is needed."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            value = math.ceil(n / size * 10) / 10 if round_up else n / size
            return f"{value:.1f} {unit}"
    return f"{int(n)} B"


def current_rss():
    """Resident bytes of this process now: anonymous memory plus the mapped file pages it holds."""
    return platform.current_rss()


def peak_rss():
    """The high-water mark of resident bytes since the process started."""
    return platform.peak_rss()


def available_memory():
    """What the kernel says can be given to a new process without swapping (MemAvailable)."""
    return platform.available_memory()


def default_budget():
    """Without --max-memory: 85% of the memory available now, leaving room for the OS and page cache."""
    return int(available_memory() * 0.85)
