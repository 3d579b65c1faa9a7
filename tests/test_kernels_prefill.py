"""Prefill on the numba backend (many-row GEMMs, attention head by head, element-wise steps on all threads)
against transformers on the dequantized weights, across query blocks, ragged batches and cached prefixes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tinyllama_ref
from gptq_models import make_gptq_llama
from hf_models import hf_logits, rel_err
from tinyllama_ref import attention

PROMPT = [1] + [int(t) for t in np.random.default_rng(7).integers(3, 320, size=199)]   # 200 tokens

VARIANTS = {
    "4bit-g32-actorder": dict(bits=4, group_size=32, act_order=True),
    "3bit-g32-actorder-asym": dict(bits=3, group_size=32, act_order=True, sym=False),
}


@pytest.fixture(scope="module")
def gptq_models(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            path = str(tmp_path_factory.mktemp(name))
            made[name] = (path, make_gptq_llama(path, layers=2, **VARIANTS[name]))
        return made[name]
    return get


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_long_prompt_matches_transformers(gptq_models, variant, backend, monkeypatch):
    """200 tokens in query blocks of 64: every block sees the keys of the blocks before it."""
    path, ref_model = gptq_models(variant)
    ref = hf_logits(ref_model, PROMPT)                                    # [T, V]
    monkeypatch.setattr(attention, "QUERY_BLOCK", 64)
    ours = tinyllama_ref.load(path, backend=backend).logits(PROMPT)
    assert rel_err(ours, ref) < 1e-4


def test_ragged_batch_and_cached_prefix_match_transformers(gptq_models):
    """Two prompts in one pass (rows of both in every matmul), then a 40-token chunk after a cached prefix."""
    path, ref_model = gptq_models("4bit-g32-actorder")
    model = tinyllama_ref.load(path, backend="numba")
    a, b = PROMPT[:90], PROMPT[100:160]
    with model.new_cache(2, 200) as cache:
        both = model.forward([np.array(a), np.array(b)], cache, [0, 1], all_logits=True)   # [150, V]
        assert rel_err(both[:90], hf_logits(ref_model, a)) < 1e-4
        assert rel_err(both[90:], hf_logits(ref_model, b)) < 1e-4
        more = model.forward([np.array(PROMPT[90:130])], cache, [0], all_logits=True)     # [40, V]
    assert rel_err(more, hf_logits(ref_model, PROMPT[:130])[90:]) < 1e-4


def test_model_without_openblas_variables_matches_reference(gptq_models, tmp_path):
    """A user's machine sets neither OPENBLAS_CORETYPE nor OPENBLAS_L2_SIZE, so NumPy's OpenBLAS picks its own
    kernels (AVX-512 here): the numba backend must agree with transformers there too."""
    path, ref_model = gptq_models("4bit-g32-actorder")
    out = tmp_path / "logits.npy"
    code = ("import json, sys, numpy as np, threadpoolctl, tinyllama_ref\n"
            "ids = json.loads(sys.argv[2])\n"
            "np.save(sys.argv[3], tinyllama_ref.load(sys.argv[1], backend='numba').logits(ids))\n"
            "print(json.dumps([i.get('architecture') for i in threadpoolctl.threadpool_info()]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    run = subprocess.run([sys.executable, "-c", code, path, json.dumps(PROMPT[:120]), str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert rel_err(np.load(out), hf_logits(ref_model, PROMPT[:120])) < 1e-4
