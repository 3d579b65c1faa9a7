"""`bench int8-accuracy`: its KL / top-1 / perplexity arithmetic against PyTorch, and a run on a tiny model."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tinyllama_ref.cli import main
from tiers import needs_int8
from tinyllama_ref.measure.int8_accuracy import compare_logits, perplexity_of


def test_kl_top1_and_perplexity_agree_with_torch():
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(7, 50)).astype(np.float32) * 3
    approx = exact + rng.normal(size=exact.shape).astype(np.float32) * 0.5
    kl, top1 = compare_logits(exact, approx)
    p, q = torch.tensor(exact, dtype=torch.float64), torch.tensor(approx, dtype=torch.float64)
    expected = torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True,
                                          reduction="batchmean")
    assert kl == pytest.approx(float(expected), rel=1e-9)
    assert top1 == float((p.argmax(-1) == q.argmax(-1)).double().mean())
    ids = rng.integers(0, 50, size=7)
    nll = torch.nn.functional.cross_entropy(p[:-1], torch.tensor(ids[1:]))
    assert perplexity_of(exact, ids) == pytest.approx(float(torch.exp(nll)), rel=1e-9)


@needs_int8
def test_bench_int8_accuracy_on_a_tiny_model():
    run = CliRunner().invoke(main, ["bench", "int8-accuracy", "--tiny", "--tokens", "12,20", "--generate", "8",
                                   "--json"])
    assert run.exit_code == 0, run.output
    rec = json.loads(run.output.strip().splitlines()[-1])
    assert set(rec["layer_error"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj"}
    for err in rec["layer_error"].values():
        assert err["layers"] == rec["n_layers"] and 1e-4 < err["median"] <= err["max"] < 0.05
    assert [p["tokens"] for p in rec["prompts"]] == [12, 20]
    for p in rec["prompts"]:
        assert 0 < p["kl"] < 0.01 and 0.5 <= p["top1_agreement"] <= 1   # int8 ran (KL > 0) and stays close
    assert rec["generated"]["tokens"] == 9 and rec["generated"]["perplexity_int8"] > 1


def test_bench_int8_accuracy_bad_input_is_one_line_and_exit_1(tmp_path):
    missing = tmp_path / "nowhere"
    run = CliRunner().invoke(main, ["bench", "int8-accuracy", str(missing)])
    assert run.exit_code == 1 and str(missing) in run.output and "Traceback" not in run.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    run = CliRunner().invoke(main, ["bench", "int8-accuracy", str(broken)])
    assert run.exit_code == 1 and str(broken) in run.output and "Traceback" not in run.output
    run = CliRunner().invoke(main, ["bench", "int8-accuracy", "--tiny", "--tokens", "1"])
    assert run.exit_code == 2 and "at least 2 tokens" in run.output
