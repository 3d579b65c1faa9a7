"""The CPU tiers a test may run here (kernels/cpu.py): every tier up to this process's, and a skip marker for
tests that need a tier above it (skipped with the reason, never failed)."""

import pytest

from tinyllama_ref.kernels import cpu, table

RUNNABLE = cpu.runnable_tiers()
TOP = cpu.process_tier()


def needs(tier):
    """Skip unless this process runs `tier` (or above)."""
    return pytest.mark.skipif(not cpu.at_least(TOP, tier),
                              reason=f"needs the {tier} CPU tier; this process runs {cpu.describe()}")


def below(tier):
    """The highest runnable tier below `tier` (e.g. a CPU without AMX), or None."""
    lower = [t for t in RUNNABLE if cpu.TIERS.index(t) < cpu.TIERS.index(tier)]
    return lower[-1] if lower else None


needs_int8 = pytest.mark.skipif(not table.int8_available(TOP),
                                reason=f"int8 mode has no kernels at the {TOP} tier")
