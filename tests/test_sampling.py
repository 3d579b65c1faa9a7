"""Sampling: hand-computed distributions, transformers' own logits processors, seeds, validation."""

import json
import math

import numpy as np
import pytest

from tinyllama_ref.errors import GenerationError
from tinyllama_ref.sampling import (Sampler, SamplingParams, apply_repetition_penalty, min_p_filter,
                                    process_logits, softmax, top_k_filter, top_p_filter)


def probs_of(logits, previous_ids=(), **params):
    return Sampler(SamplingParams(**params)).probabilities(np.asarray(logits, dtype=np.float32), previous_ids)


# ---- hand-computed cases ----

def test_plain_softmax():
    # logits ln 1, ln 2, ln 3, ln 4: probabilities 1/10, 2/10, 3/10, 4/10.
    p = probs_of(np.log([1, 2, 3, 4]))
    np.testing.assert_allclose(p, [0.1, 0.2, 0.3, 0.4], rtol=1e-6)


def test_temperature_hand_case():
    # logits [0, ln 2] at temperature 1/2 become [0, 2 ln 2]: weights 1 and 4.
    np.testing.assert_allclose(probs_of([0.0, math.log(2)], temperature=0.5), [1 / 5, 4 / 5], rtol=1e-6)
    # at temperature 2 they become [0, ln 2 / 2]: weights 1 and sqrt 2.
    np.testing.assert_allclose(probs_of([0.0, math.log(2)], temperature=2.0),
                               [1 / (1 + 2 ** 0.5), 2 ** 0.5 / (1 + 2 ** 0.5)], rtol=1e-6)


def test_top_k_hand_case():
    # top 2 of weights 1, 2, 3, 4: 3/7 and 4/7.
    np.testing.assert_allclose(probs_of(np.log([1, 2, 3, 4]), top_k=2), [0, 0, 3 / 7, 4 / 7], rtol=1e-6)
    # ties with the k-th largest stay (as in transformers): weights 1, 3, 3, 4 with k=2 keep 3, 3, 4.
    np.testing.assert_allclose(probs_of(np.log([1, 3, 3, 4]), top_k=2), [0, 0.3, 0.3, 0.4], rtol=1e-6)


def test_top_p_hand_case():
    w = np.log([1, 2, 3, 4])      # probabilities 0.1 0.2 0.3 0.4
    # top_p 0.75: ascending cumulative 0.1, 0.3, 0.6, 1.0; drop those <= 0.25 -> only 0.1 goes.
    np.testing.assert_allclose(probs_of(w, top_p=0.75), [0, 2 / 9, 3 / 9, 4 / 9], rtol=1e-6)
    # top_p 0.5: drop cumulative <= 0.5 -> 0.1 and 0.2 go; 0.3 + 0.4 = 0.7 >= 0.5 remains.
    np.testing.assert_allclose(probs_of(w, top_p=0.5), [0, 0, 3 / 7, 4 / 7], rtol=1e-6)
    # top_p 0.3: only 0.4 stays (it alone holds 0.4 >= 0.3).
    np.testing.assert_allclose(probs_of(w, top_p=0.3), [0, 0, 0, 1], rtol=1e-6)
    # a tiny top_p still keeps the most likely token.
    np.testing.assert_allclose(probs_of(w, top_p=1e-9), [0, 0, 0, 1], rtol=1e-6)


def test_min_p_hand_case():
    w = np.log([1, 2, 3, 4])
    # min_p 0.6: threshold 0.6 * 0.4 = 0.24 -> 0.1 and 0.2 go.
    np.testing.assert_allclose(probs_of(w, min_p=0.6), [0, 0, 3 / 7, 4 / 7], rtol=1e-6)
    # min_p 0.3: threshold 0.12 -> only 0.1 goes.
    np.testing.assert_allclose(probs_of(w, min_p=0.3), [0, 2 / 9, 3 / 9, 4 / 9], rtol=1e-6)
    # min_p 1: only tokens tied with the top survive.
    np.testing.assert_allclose(probs_of(np.log([4, 1, 4]), min_p=1.0), [0.5, 0, 0.5], rtol=1e-6)


def test_repetition_penalty_hand_case():
    logits = np.array([2.0, -1.0, 0.5, 3.0])
    # seen ids 0 and 1 (1 twice: penalised once); positive logits are divided, negative multiplied.
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    np.testing.assert_array_equal(out, [1.0, -2.0, 0.5, 3.0])
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, 3.0])       # input untouched
    # a penalty below 1 rewards repeats; ids past the vocabulary are ignored, not an IndexError.
    np.testing.assert_array_equal(apply_repetition_penalty(logits, [3, 99], 0.5), [2.0, -1.0, 0.5, 6.0])


def test_repetition_penalty_comes_before_top_k_and_applies_to_greedy():
    logits = [3.0, 2.5, 0.0]
    # Penalty 2 on seen token 0 first: [1.5, 2.5, 0]; only then top_k=1, which keeps token 1.
    np.testing.assert_allclose(probs_of(logits, [0], repetition_penalty=2.0, top_k=1), [0, 1, 0])
    # Greedy sees the penalty too (transformers applies it outside the sampling-only warpers).
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=2.0)).sample(np.float32(logits), [0]) == 1


def test_top_k_top_p_min_p_combined():
    w = np.log([1, 2, 3, 4, 10])    # probabilities /20
    # top_k 4 -> weights 2, 3, 4, 10 (sum 19); top_p 0.6 on those: ascending cumulative 2/19, 5/19, 9/19,
    # 1; drop <= 0.4 (= 7.6/19) -> 2 and 3 go; min_p 0.5 of [4, 10]/14: threshold 5/14 > 4/14 -> only 10.
    np.testing.assert_allclose(probs_of(w, top_k=4, top_p=0.6), [0, 0, 0, 4 / 14, 10 / 14], rtol=1e-6)
    np.testing.assert_allclose(probs_of(w, top_k=4, top_p=0.6, min_p=0.5), [0, 0, 0, 0, 1], rtol=1e-6)


# ---- against transformers' logits processors ----

def hf_processors():
    return pytest.importorskip("transformers.generation.logits_process")


@pytest.mark.parametrize("trial", range(5))
def test_each_step_matches_transformers(trial):
    lp = hf_processors()
    import torch
    rng = np.random.default_rng(trial)
    logits = (rng.standard_normal(64) * 3).astype(np.float32)           # [V]
    history = rng.integers(0, 64, size=10)
    t_logits = torch.from_numpy(logits)[None, :]                        # [1, V]
    t_ids = torch.from_numpy(history)[None, :]                           # [1, T]
    cases = [
        (lambda x: apply_repetition_penalty(x, history, 1.3), lp.RepetitionPenaltyLogitsProcessor(1.3)),
        (lambda x: top_k_filter(x, 7), lp.TopKLogitsWarper(7)),
        (lambda x: top_p_filter(x, 0.8), lp.TopPLogitsWarper(0.8)),
        (lambda x: min_p_filter(x, 0.1), lp.MinPLogitsWarper(0.1)),
    ]
    for ours, theirs in cases:
        expected = theirs(t_ids, t_logits.clone())[0].numpy()
        np.testing.assert_allclose(ours(logits.astype(np.float64)), expected, rtol=1e-6)


@pytest.mark.parametrize("trial", range(5))
def test_full_pipeline_matches_transformers_generate_order(trial):
    lp = hf_processors()
    import torch
    rng = np.random.default_rng(100 + trial)
    logits = (rng.standard_normal(200) * 2).astype(np.float32)
    history = rng.integers(0, 200, size=30)
    # The list transformers' generate() builds for these settings (generation/utils.py _get_logits_processor).
    chain = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.7),
                                    lp.TopKLogitsWarper(40), lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.05)])
    expected = torch.softmax(chain(torch.from_numpy(history)[None], torch.from_numpy(logits)[None]), -1)[0]
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    ours = Sampler(params).probabilities(logits, history)
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-6)
    assert (ours > 0).sum() == (expected.numpy() > 0).sum()


# ---- drawing ----

def test_temperature_zero_is_greedy_argmax():
    rng = np.random.default_rng(0)
    sampler = Sampler(SamplingParams(temperature=0, top_k=3, top_p=0.5, seed=1))
    for _ in range(20):
        logits = rng.standard_normal(50).astype(np.float32)
        assert sampler.sample(logits) == int(np.argmax(logits))


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = np.zeros((30, 100), dtype=np.float32)                   # uniform: every draw is random
    def run(seed):
        sampler = Sampler(SamplingParams(seed=seed))
        return [sampler.sample(row) for row in logits]
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_draw_frequencies_follow_the_distribution():
    logits = np.log(np.array([1, 2, 3, 4], dtype=np.float32))
    sampler = Sampler(SamplingParams(seed=0))
    counts = np.bincount([sampler.sample(logits) for _ in range(20000)], minlength=4)
    # 20000 draws: standard error of each frequency is below 0.0035; allow about 4 of them.
    np.testing.assert_allclose(counts / 20000, [0.1, 0.2, 0.3, 0.4], atol=0.015)


def test_filtered_tokens_are_never_drawn():
    logits = np.log(np.array([1, 2, 3, 4], dtype=np.float32))
    sampler = Sampler(SamplingParams(top_k=2, seed=3))
    assert {sampler.sample(logits) for _ in range(2000)} == {2, 3}


def test_sample_batch_equals_row_by_row():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((4, 30)).astype(np.float32)         # [B, V]
    histories = [[1, 2], [], [5, 5, 5], [29]]
    params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=9)
    one = Sampler(params)
    expected = [one.sample(logits[b], histories[b]) for b in range(4)]
    assert Sampler(params).sample_batch(logits, histories) == expected
    with pytest.raises(GenerationError, match="histories"):
        Sampler(params).sample_batch(logits, histories[:3])


def test_bad_logits_are_refused():
    with pytest.raises(GenerationError, match="NaN"):
        Sampler(SamplingParams(seed=0)).sample(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(GenerationError, match="shape"):
        process_logits(np.zeros((2, 3)), [], SamplingParams())


def test_softmax_gives_zero_to_removed_tokens():
    np.testing.assert_array_equal(softmax(np.array([0.0, -np.inf])), [1.0, 0.0])


# ---- parameters ----

@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(top_k=-1), "top_k must be a whole number"),
    (dict(top_k=2.5), "top_k must be a whole number"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(min_p=1.1), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
    (dict(seed=-3), "seed must be a whole number"),
    (dict(temperature="hot"), "temperature must be a number"),
])
def test_nonsense_values_are_refused(bad, message):
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**bad)


def test_from_generation_config(tmp_path):
    # No file: transformers' defaults, which decode greedily.
    assert SamplingParams.from_generation_config(str(tmp_path)).temperature == 0
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    p = SamplingParams.from_generation_config(str(tmp_path))
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0.6, 0.9, 50, 0.0, 1.0)
    p = SamplingParams.from_generation_config(str(tmp_path), temperature=None, top_k=0, seed=4)
    assert (p.temperature, p.top_k, p.seed) == (0.6, 0, 4)
    # do_sample false: greedy, unless the caller asks for a temperature.
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert SamplingParams.from_generation_config(str(tmp_path)).greedy
    assert SamplingParams.from_generation_config(str(tmp_path), temperature=0.8).temperature == 0.8
    with pytest.raises(GenerationError, match="top_p must be in"):
        SamplingParams.from_generation_config(str(tmp_path), top_p=2.0)
    with pytest.raises(GenerationError, match="unknown sampling option"):
        SamplingParams.from_generation_config(str(tmp_path), topp=0.5)
    (tmp_path / "generation_config.json").write_text("{broken")
    with pytest.raises(GenerationError, match="not valid JSON"):
        SamplingParams.from_generation_config(str(tmp_path))
