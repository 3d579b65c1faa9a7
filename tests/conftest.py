import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")         # tests never reach a model hub

# `python -m pytest` (and `python -m tinyllama_ref` in the tests' subprocesses) puts the checkout on sys.path,
# and there our kernels/ folder would stand in for Hugging Face's `kernels` package, which transformers 5
# imports (ImportError: cannot import name 'CUDAProperties' from 'kernels'). The installed package needs no
# such entry: tinyllama_ref.kernels comes from the install. PYTHONSAFEPATH keeps it off in subprocesses.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"
sys.path.insert(0, os.path.dirname(__file__))   # test helper modules (hf_models, gptq_packer, ...)

from hf_models import make_hf_llama  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Build tiny transformers checkpoints on demand, once per session: hf_checkpoints(name, **kwargs)."""
    made = {}

    def get(name, **kwargs):
        if name not in made:
            made[name] = make_hf_llama(str(tmp_path_factory.mktemp(name)), **kwargs)
        return made[name]
    return get
