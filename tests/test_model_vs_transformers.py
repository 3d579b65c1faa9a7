"""Our forward pass against transformers' LlamaForCausalLM on the same saved weights."""

import numpy as np
import pytest

import tinyllama_ref
from hf_models import hf_greedy, hf_logits, hf_model, rel_err

PROMPT = [1, 17, 250, 3, 99, 4, 180, 42, 7, 311, 64, 5]

CASES = {
    "f32": dict(dtype="float32"),
    "f16": dict(dtype="float16"),
    "bf16": dict(dtype="bfloat16"),
    "f32-sharded": dict(dtype="float32", shard_kb=60),
    "f16-sharded": dict(dtype="float16", shard_kb=60),
    "bf16-sharded": dict(dtype="bfloat16", shard_kb=60),
    "rope-linear-tied": dict(dtype="float32", rope_factor=2.0, tie=True, seed=3),
    "mha-3layers": dict(dtype="float32", kv_heads=8, layers=3, seed=5),
}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("case", list(CASES))
def test_teacher_forced_logits_match(hf_checkpoints, case, backend):
    path = hf_checkpoints(case, **CASES[case])
    ref = hf_logits(hf_model(path), PROMPT)                               # [T, V]
    ours = tinyllama_ref.load(path, backend=backend).logits(PROMPT)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("case", ["f32", "bf16-sharded"])
def test_kv_cache_decode_equals_full_forward(hf_checkpoints, case):
    model = tinyllama_ref.load(hf_checkpoints(case, **CASES[case]), backend="numpy")
    full = model.logits(PROMPT)                                           # [T, V]
    cache = model.new_cache(1, len(PROMPT))
    steps = [model.forward([np.array(PROMPT[:5])], cache, [0], all_logits=True)]
    for tok in PROMPT[5:]:
        steps.append(model.forward([np.array([tok])], cache, [0], all_logits=True))
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=0, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("case", ["f32", "mha-3layers"])
def test_numba_decode_steps_match_transformers(hf_checkpoints, case):
    """Decode steps and short chunks on the numba backend (compiled attention, RMSNorm and RoPE of a few
    rows, kernels/generic/rowwise.py), two sequences side by side, against transformers' full forward."""
    path = hf_checkpoints(case, **CASES[case])
    ref = hf_logits(hf_model(path), PROMPT)                               # [T, V]
    model = tinyllama_ref.load(path, backend="numba")
    # Each sequence is held to transformers on its own. The two need not agree bit for bit: the dense
    # linears run on BLAS, whose GEMM may sum a row differently by where it falls in the matrix (OpenBLAS's
    # Haswell kernel does for 6 rows).
    firsts, seconds = [], []
    with model.new_cache(2, len(PROMPT)) as cache:
        for chunk in (PROMPT[:3], PROMPT[3:4], PROMPT[4:7], PROMPT[7:8], PROMPT[8:9], PROMPT[9:]):
            both = model.forward([np.array(chunk)] * 2, cache, [0, 1], all_logits=True)   # [2 * n, V]
            firsts.append(both[:len(chunk)])
            seconds.append(both[len(chunk):])
    assert rel_err(np.concatenate(firsts), ref) < 1e-4
    assert rel_err(np.concatenate(seconds), ref) < 1e-4


@pytest.mark.parametrize("case", ["f32", "f16-sharded", "rope-linear-tied"])
def test_greedy_continuation_matches_transformers(hf_checkpoints, case):
    path = hf_checkpoints(case, **CASES[case])
    ref = hf_greedy(hf_model(path), PROMPT, 32)
    ours = tinyllama_ref.load(path, backend="numpy").generate(PROMPT, max_new_tokens=32, stop_ids=[])
    assert ours == ref


def test_ragged_batch_equals_one_at_a_time(hf_checkpoints):
    model = tinyllama_ref.load(hf_checkpoints("f32", **CASES["f32"]), backend="numpy")
    prompts = [PROMPT, PROMPT[:3], [1, 200, 201, 202, 203, 9, 8]]
    batch = model.generate(prompts, max_new_tokens=10, stop_ids=[])
    single = [model.generate(p, max_new_tokens=10, stop_ids=[]) for p in prompts]
    assert batch == single
