"""tools/side_by_side.py's records state one run: the median of the rounds, and the rates derived from it."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("side_by_side", ROOT / "tools" / "side_by_side.py")
side_by_side = importlib.util.module_from_spec(spec)
spec.loader.exec_module(side_by_side)


def test_a_row_takes_the_median_and_the_rates_follow_it():
    # the last round ran 16 tokens in 2 s (8 tokens/s, 29.6 GB/s of a 37 GB/s machine); the rounds gave 6, 5
    # and 8 tokens/s, so the median is 6: 2 2/3 s, 29.6 * 6 / 8 = 22.2 GB/s, 0.8 * 6 / 8 = 0.6 of memory
    last = {"test": "tg16", "tokens": 16, "seconds": 2.0, "tokens_per_s": 8.0, "samples_s": [2.0],
            "weights_gbps": 29.6, "fraction_of_memory_bw": 0.8}
    row = side_by_side.median_row(last, [6.0, 5.0, 8.0])
    assert row["tokens_per_s"] == 6.0 and row["rounds_tokens_per_s"] == [6.0, 5.0, 8.0]
    assert row["seconds"] == pytest.approx(16 / 6, abs=1e-4)
    assert row["weights_gbps"] == pytest.approx(22.2) and row["fraction_of_memory_bw"] == pytest.approx(0.6)
    assert "samples_s" not in row                  # the last round's own samples would contradict the median


def test_a_prefill_row_scales_its_gemm_rate():
    last = {"test": "pp64", "tokens": 64, "seconds": 4.0, "tokens_per_s": 16.0, "gemm_gflops": 200.0,
            "fraction_of_blas": 1.0}
    row = side_by_side.median_row(last, [12.0, 16.0])              # median 14
    assert row["gemm_gflops"] == pytest.approx(175.0) and row["fraction_of_blas"] == pytest.approx(0.875)
