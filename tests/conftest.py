import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")         # tests never reach a model hub
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
