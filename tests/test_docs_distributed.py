"""The 70B-over-two-machines projection in docs/distributed.md: its inputs come from the code that computes them."""

import re
from pathlib import Path

import pytest

from tinyllama_ref.config import preset
from tinyllama_ref.distributed.bench import projection, weight_bytes_per_token
from tinyllama_ref.quant import QuantConfig

QC = QuantConfig(bits=4, group_size=128, desc_act=True)
DOC = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text(encoding="utf-8")


def test_bytes_per_token_match_the_checkpoints():
    layer7, head7 = weight_bytes_per_token(preset("llama2-7b"), QC)
    layer70, head70 = weight_bytes_per_token(preset("llama2-70b"), QC)
    assert 32 * layer7 + head7 == pytest.approx(3.63e9, rel=2e-3)       # the 7B's 3.63 GB a token, as measured
    assert layer70 / layer7 == pytest.approx(4.22, abs=0.01)
    assert 80 * layer70 + head70 == pytest.approx(36.13e9, rel=1e-3)
    assert "36.13 GB" in DOC and "4.22x" in DOC


def test_the_projection_is_bytes_times_rate_plus_hops():
    # Zen 5: 7B decode at 12.93 tokens/s reads 3.63 GB a token
    measured = 3.634e9
    out = projection("llama2-70b", QC, measured, compute_s=1 / 12.93, overhead_s_per_call=0.0015)
    assert out["projected_s_per_token_2_machines"] == pytest.approx(0.77, abs=0.005)
    assert re.search(r"\*\*0\.77 s on two Zen 5 machines\*\*", DOC)
