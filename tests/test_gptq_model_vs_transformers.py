"""A tiny GPTQ Llama in TheBloke's layout against transformers running the dequantized weights."""

import pytest

import tinyllama_ref
from gptq_models import make_gptq_llama
from hf_models import hf_greedy, hf_logits, rel_err

PROMPT = [1, 17, 250, 3, 99, 4, 180, 42, 7, 311, 64, 5]

VARIANTS = {
    "4bit-g32-actorder": dict(bits=4, group_size=32, act_order=True),
    "4bit-none-actorder": dict(bits=4, group_size=-1, act_order=True),
    "3bit-g32-actorder": dict(bits=3, group_size=32, act_order=True),
    "3bit-none": dict(bits=3, group_size=-1, act_order=False),
    "4bit-g16-asym-v2": dict(bits=4, group_size=16, act_order=False, sym=False, checkpoint_format="gptq_v2"),
}


@pytest.fixture(scope="module")
def gptq_models(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            path = str(tmp_path_factory.mktemp(name))
            made[name] = (path, make_gptq_llama(path, **VARIANTS[name]))
        return made[name]
    return get


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_dequantized_transformers(gptq_models, variant, backend):
    path, ref_model = gptq_models(variant)
    ref = hf_logits(ref_model, PROMPT)
    ours = tinyllama_ref.load(path, backend=backend).logits(PROMPT)
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("variant", ["4bit-g32-actorder", "3bit-g32-actorder"])
def test_greedy_identical_and_backends_agree(gptq_models, variant):
    path, ref_model = gptq_models(variant)
    ref = hf_greedy(ref_model, PROMPT, 24)
    slow = tinyllama_ref.load(path, backend="numpy")
    fast = tinyllama_ref.load(path, backend="numba")
    assert slow.generate(PROMPT, max_new_tokens=24, stop_ids=[]) == ref
    assert fast.generate(PROMPT, max_new_tokens=24, stop_ids=[]) == ref
    a, b = slow.logits(PROMPT), fast.logits(PROMPT)
    assert rel_err(b, a) < 1e-5
