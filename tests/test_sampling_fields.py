"""OpenAI's presence/frequency penalties and logit bias in sampling.py, by hand; the repetition penalty of a
Sampler over prompt + generated ids against transformers' RepetitionPenaltyLogitsProcessor."""

import numpy as np
import pytest

from tinyllama_ref.errors import GenerationError
from tinyllama_ref.sampling import (Sampler, SamplingParams, apply_logit_bias, apply_presence_frequency,
                                    process_logits)


def test_presence_and_frequency_penalty_hand_case():
    logits = np.zeros(5)
    generated = [1, 1, 1, 3]                           # token 1 three times, token 3 once
    out = apply_presence_frequency(logits, generated, presence=0.5, frequency=0.25)
    np.testing.assert_allclose(out, [0, -(3 * 0.25 + 0.5), 0, -(0.25 + 0.5), 0])
    np.testing.assert_allclose(apply_presence_frequency(logits, generated, 0.0, 0.0), logits)
    np.testing.assert_allclose(apply_presence_frequency(logits, [], 1.0, 1.0), logits)
    # A negative penalty encourages repetition: it adds.
    np.testing.assert_allclose(apply_presence_frequency(logits, [2], -1.0, 0.0), [0, 0, 1, 0, 0])


def test_logit_bias_adds_by_token_id():
    out = apply_logit_bias(np.array([1.0, 2.0, 3.0]), ((0, 100), (2, -100.0)))
    np.testing.assert_allclose(out, [101, 2, -97])


def test_openai_penalties_count_generated_tokens_only():
    # The prompt holds token 2 many times; only what the Sampler chose counts.
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=2.0))
    logits = np.array([0.0, 1.0, 3.0, 2.5])
    prompt = [2, 2, 2]
    assert sampler.sample(logits, prompt) == 2          # nothing generated yet: no penalty
    assert sampler.sample(logits, prompt + [2]) == 3     # 3 - 2 < 2.5: the penalty moved greedy off token 2
    assert sampler.generated == [2, 3]


def test_logit_bias_forces_and_bans_a_token_even_greedy():
    logits = np.array([5.0, 0.0, 1.0])
    assert Sampler(SamplingParams(temperature=0, logit_bias=((1, 100),))).sample(logits) == 1
    assert Sampler(SamplingParams(temperature=0, logit_bias=((0, -100),))).sample(logits) == 2
    p = Sampler(SamplingParams(temperature=1.0, logit_bias=((1, 100),))).probabilities(logits)
    assert p[1] > 0.999


def test_penalties_come_after_repetition_penalty():
    params = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=1.0)
    out = process_logits(np.array([4.0, -4.0]), [0, 1], params, generated_ids=[1])
    np.testing.assert_allclose(out, [4 / 2, -4 * 2 - 1])


def test_sample_batch_refuses_per_sequence_penalties():
    with pytest.raises(GenerationError, match="Sampler per sequence"):
        Sampler(SamplingParams(frequency_penalty=0.5)).sample_batch(np.zeros((2, 4)), [[1], [2]])


@pytest.mark.parametrize("bad,message", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias=((1, 200),)), "logit_bias"), (dict(logit_bias=((-1, 1),)), "logit_bias"),
    (dict(logit_bias=(("a", 1),)), "logit_bias"), (dict(presence_penalty=float("nan")), "finite"),
])
def test_nonsense_values_are_refused(bad, message):
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**bad)


@pytest.mark.parametrize("trial", range(3))
def test_repetition_penalty_over_prompt_and_generated_matches_transformers(trial):
    """TGI's repetition_penalty is HF's: divide positive logits, multiply negative ones, of every distinct id
    in prompt + generated tokens. transformers' processor is the independent reference."""
    lp = pytest.importorskip("transformers.generation.logits_process")
    import torch
    rng = np.random.default_rng(7 + trial)
    logits = (rng.standard_normal(50) * 3).astype(np.float32)       # [V], both signs
    prompt = list(rng.integers(0, 50, size=6))
    generated = list(rng.integers(0, 50, size=4))
    history = prompt + generated                                     # repeats included
    expected = lp.RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([history]), torch.from_numpy(logits)[None])
    ours = process_logits(logits, history, SamplingParams(temperature=0, repetition_penalty=1.7), generated)
    np.testing.assert_allclose(ours, expected[0].numpy(), rtol=1e-6)
