"""The model's shape: read from a Hugging Face config.json, or taken from a named preset.

Only what the forward pass needs is kept. The vocabulary size is NOT trusted from config.json: Meditron's
says 32000-something while its embedding has 32017 rows, so the loader fills `vocab_size` from the tensor.
"""

import json
import os
from dataclasses import dataclass, field, replace

from .errors import ConfigError


@dataclass(frozen=True)
class LlamaConfig:
    dim: int                      # hidden_size
    hidden_dim: int               # intermediate_size (SwiGLU width)
    n_layers: int                 # num_hidden_layers
    n_heads: int                  # num_attention_heads
    n_kv_heads: int               # num_key_value_heads (grouped-query attention when < n_heads)
    head_dim: int                 # usually dim // n_heads
    vocab_size: int               # rows of the embedding (filled from the checkpoint)
    norm_eps: float = 1e-5        # rms_norm_eps
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0   # "linear" rope scaling divides positions by this
    max_seq_len: int = 4096       # max_position_embeddings
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_ids: tuple = (2,)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def to_hf(self):
        """The config.json dict transformers would write for this shape (used by `synth` and tests)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling_factor == 1.0
            else {"type": "linear", "factor": self.rope_scaling_factor},
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "pad_token_id": 0,
            "torch_dtype": "float16",
        }


# Shapes of the published Llama-2 models (Touvron et al., 2023; the HF config.json files).
PRESETS = {
    "tiny": LlamaConfig(dim=256, hidden_dim=688, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32,
                        vocab_size=1000, max_seq_len=512),
    "llama2-7b": LlamaConfig(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32,
                             head_dim=128, vocab_size=32000),
    "llama2-13b": LlamaConfig(dim=5120, hidden_dim=13824, n_layers=40, n_heads=40, n_kv_heads=40,
                              head_dim=128, vocab_size=32000),
    "llama2-70b": LlamaConfig(dim=8192, hidden_dim=28672, n_layers=80, n_heads=64, n_kv_heads=8,
                              head_dim=128, vocab_size=32017),   # Meditron-70B's embedding rows
}


def preset(name):
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _require(hf, key, path):
    if key not in hf:
        raise ConfigError(f"{path}: missing field {key!r} (is this a Llama config.json?)")
    value = hf[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{path}: {key} must be a positive integer, found {value!r}")
    return value


def _rope_params(hf):
    """transformers < 5 writes rope_theta + rope_scaling; 5.x writes one rope_parameters dict."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), (params if params else hf.get("rope_scaling"))


def _rope_factor(scaling, path):
    if not scaling:
        return 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return 1.0
    if kind != "linear":
        raise ConfigError(f"{path}: rope_scaling type {kind!r} is not supported (only 'linear')")
    factor = float(scaling.get("factor", 1.0))
    if factor <= 0:
        raise ConfigError(f"{path}: rope_scaling factor must be positive, found {factor}")
    return factor


def config_from_hf(hf, path="config.json", vocab_size=None):
    """LlamaConfig from the dict in a Hugging Face config.json."""
    if hf.get("model_type", "llama") not in ("llama", "mistral"):
        raise ConfigError(f"{path}: model_type {hf.get('model_type')!r} is not a Llama model")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{path}: hidden_act {act!r} is not supported (Llama uses 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(f"{path}: attention_bias / mlp_bias are not supported (Llama-2 has none)")
    dim = _require(hf, "hidden_size", path)
    n_heads = _require(hf, "num_attention_heads", path)
    n_kv = hf.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        raise ConfigError(f"{path}: num_attention_heads {n_heads} is not a multiple of "
                          f"num_key_value_heads {n_kv}")
    head_dim = hf.get("head_dim") or dim // n_heads
    if head_dim % 2:
        raise ConfigError(f"{path}: head_dim {head_dim} must be even for rotary embeddings")
    theta, scaling = _rope_params(hf)
    eos = hf.get("eos_token_id", 2)
    eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return LlamaConfig(
        dim=dim,
        hidden_dim=_require(hf, "intermediate_size", path),
        n_layers=_require(hf, "num_hidden_layers", path),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=vocab_size or hf.get("vocab_size", 32000),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling_factor=_rope_factor(scaling, path),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id", 1) if hf.get("bos_token_id") is not None else 1,
        eos_token_ids=eos,
        extra=hf,
    )


def read_json(path):
    """A JSON file as a dict, with errors that name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def load_config(checkpoint_dir, vocab_size=None):
    path = os.path.join(checkpoint_dir, "config.json")
    return config_from_hf(read_json(path), path, vocab_size)


def with_vocab(cfg, vocab_size):
    return replace(cfg, vocab_size=vocab_size)
