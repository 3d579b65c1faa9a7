"""The model's shape: read from a Hugging Face config.json, or taken from a named preset.

Only what the forward pass needs is kept. The vocabulary size is NOT trusted from config.json: Meditron's
says 32000-something while its embedding has 32017 rows, so the loader fills `vocab_size` from the tensor.
"""

import json
import math
import os
import stat
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


# -- reading files: the one JSON reader ---------------------------------------------------------------------

MAX_JSON_BYTES = 100 * 1024 * 1024     # config and tokenizer JSON files are kilobytes; an index a few MB


def check_regular_file(path, error=ConfigError, what="file"):
    """os.stat the path (never open it) and refuse anything but a regular file: a directory, a FIFO (whose
    open() would wait for a writer forever), a device or a socket. Returns the stat result."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{path}: file not found") from None
    except (OSError, ValueError, TypeError) as e:
        raise error(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = "FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else \
            "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else \
            "socket" if stat.S_ISSOCK(st.st_mode) else "special file"
        raise error(f"{path}: is a {kind}, not a regular file; expected a {what}")
    return st


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_json(raw, where, error=ConfigError):
    """JSON text (str or UTF-8 bytes) -> value; refuses duplicate keys (a second "hidden_size" must not
    silently win) and reports any problem as `error` naming `where`."""
    try:
        if isinstance(raw, (bytes, bytearray)):
            raw = bytes(raw).decode("utf-8")
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise error(f"{where}: key {e.args[0]!r} appears twice in one JSON object") from None
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:     # 5000-digit numbers, nesting deeper than Python's stack
        raise error(f"{where}: not valid JSON ({str(e) or type(e).__name__})") from None


def read_json(path, error=ConfigError, optional=False):
    """A JSON file holding one object, as a dict, with errors (of class `error`) that name the file.

    optional: a missing file gives None instead of an error. A directory, FIFO or other non-regular file in
    its place is refused without being opened.
    """
    if optional and not os.path.lexists(path):
        return None
    st = check_regular_file(path, error, "JSON file")
    if st.st_size > MAX_JSON_BYTES:
        raise error(f"{path}: {st.st_size} bytes is too large for a JSON settings file "
                    f"(limit {MAX_JSON_BYTES})")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    data = parse_json(raw.removeprefix(b"\xef\xbb\xbf"), path, error)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object at the top level, found {json_type(data)}")
    return data


def json_type(value):
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# -- typed values ------------------------------------------------------------------------------------------

MAX_INT = 2**31 - 1      # no dimension, count or position of a real model comes near this
_MISSING = object()


def _show(value):
    return f"{value!r} ({json_type(value)})" if isinstance(value, (str, bool, list, dict)) or value is None \
        else repr(value)


def config_int(d, key, path, default=_MISSING, minimum=1, error=ConfigError):
    """d[key] as an int in [minimum, MAX_INT]: a JSON integer, not a bool, a string or 256.0.
    null counts as absent (the default applies); absent with no default is an error."""
    value = d.get(key)
    if value is None:
        if default is _MISSING:
            raise error(f"{path}: missing field {key!r} (is this a Llama config.json?)")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{path}: {key} must be an integer, found {_show(value)}")
    if not minimum <= value <= MAX_INT:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{path}: {key} must be {what} (at most {MAX_INT}), found {value}")
    return value


def config_float(d, key, path, default, positive=True, error=ConfigError):
    """d[key] as a finite float (> 0 when positive); JSON integers are fine, bools and strings are not."""
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{path}: {key} must be a number, found {_show(value)}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise error(f"{path}: {key} must be a finite number, found {value}")
    if positive and value <= 0:
        raise error(f"{path}: {key} must be greater than 0, found {value}")
    return value


def config_bool(d, key, path, default, error=ConfigError):
    """d[key] as a real JSON boolean (true/false; null is the default), never the truthiness of "false"."""
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise error(f"{path}: {key} must be true or false, found {_show(value)}")
    return value


def config_str(d, key, path, default, error=ConfigError):
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise error(f"{path}: {key} must be a string, found {_show(value)}")
    return value


def config_ids(d, key, path, error=ConfigError):
    """A token id field (bos_token_id, eos_token_id): an integer >= 0, a list of them, or null -> a tuple."""
    value = d.get(key)
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_INT:
            raise error(f"{path}: {key} must be a token id (an integer >= 0) or a list of them, found "
                        f"{_show(value)}")
    return tuple(values)


def _rope(hf, path):
    """(theta, linear factor). transformers < 5 writes rope_theta + rope_scaling; 5.x one rope_parameters."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{path}: rope_parameters must be an object, found {_show(params)}")
    scaling = hf.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{path}: rope_scaling must be an object or null, found {_show(scaling)}")
    theta = config_float(hf, "rope_theta", path, 10000.0)
    if params:
        theta = config_float(params, "rope_theta", f"{path} (rope_parameters)", theta)
    block, where = (params, f"{path} (rope_parameters)") if params else (scaling, f"{path} (rope_scaling)")
    if not block:
        return theta, 1.0
    kind = block.get("rope_type", block.get("type"))
    if kind is not None and not isinstance(kind, str):
        raise ConfigError(f"{where}: rope_type must be a string, found {_show(kind)}")
    if kind in (None, "default"):
        return theta, 1.0
    if kind != "linear":
        raise ConfigError(f"{where}: rope_type {kind!r} is not supported (only 'linear')")
    if block.get("factor") is None:
        raise ConfigError(f"{where}: linear rope scaling needs a numeric factor")
    return theta, config_float(block, "factor", where, 1.0)


def config_from_hf(hf, path="config.json", vocab_size=None):
    """LlamaConfig from the dict in a Hugging Face config.json; every value it uses is type- and range-checked
    here (ints are ints, floats finite, booleans real booleans, shapes consistent)."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, found {json_type(hf)}")
    arch = hf.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise ConfigError(f"{path}: architectures must be a list of class names, found {_show(arch)}")
    model_type = config_str(hf, "model_type", path, "llama")
    if model_type not in ("llama", "mistral"):
        raise ConfigError(f"{path}: model_type {model_type!r} is not a Llama model")
    act = config_str(hf, "hidden_act", path, "silu")
    if act != "silu":
        raise ConfigError(f"{path}: hidden_act {act!r} is not supported (Llama uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if config_bool(hf, key, path, False):
            raise ConfigError(f"{path}: {key} is true, which is not supported (Llama-2 has no biases)")
    dim = config_int(hf, "hidden_size", path)
    hidden_dim = config_int(hf, "intermediate_size", path)
    n_layers = config_int(hf, "num_hidden_layers", path)
    n_heads = config_int(hf, "num_attention_heads", path)
    n_kv = config_int(hf, "num_key_value_heads", path, default=n_heads)
    if n_kv > n_heads or n_heads % n_kv:
        raise ConfigError(f"{path}: num_attention_heads {n_heads} is not a multiple of "
                          f"num_key_value_heads {n_kv}")
    if hf.get("head_dim") is None and dim % n_heads:
        raise ConfigError(f"{path}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads} and "
                          "there is no head_dim field")
    head_dim = config_int(hf, "head_dim", path, default=dim // n_heads)
    if head_dim % 2:
        raise ConfigError(f"{path}: head_dim {head_dim} must be even for rotary embeddings")
    theta, factor = _rope(hf, path)
    config_vocab = config_int(hf, "vocab_size", path, default=32000)   # not trusted (see above), but typed
    eps = config_float(hf, "rms_norm_eps", path, 1e-5)
    if eps >= 1:
        raise ConfigError(f"{path}: rms_norm_eps must be a small positive number below 1 (Llama uses 1e-5 or "
                          f"1e-6), found {eps}")
    bos = config_ids(hf, "bos_token_id", path)
    if len(bos) > 1 or isinstance(hf.get("bos_token_id"), list):
        raise ConfigError(f"{path}: bos_token_id must be one token id, found {_show(hf.get('bos_token_id'))}")
    return LlamaConfig(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=vocab_size or config_vocab,
        norm_eps=eps,
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_seq_len=config_int(hf, "max_position_embeddings", path, default=4096),
        tie_word_embeddings=config_bool(hf, "tie_word_embeddings", path, False),
        bos_token_id=bos[0] if bos else 1,
        eos_token_ids=config_ids(hf, "eos_token_id", path) if "eos_token_id" in hf else (2,),
        extra=hf,
    )


def load_config(checkpoint_dir, vocab_size=None):
    path = os.path.join(checkpoint_dir, "config.json")
    return config_from_hf(read_json(path), path, vocab_size)


def with_vocab(cfg, vocab_size):
    return replace(cfg, vocab_size=vocab_size)
