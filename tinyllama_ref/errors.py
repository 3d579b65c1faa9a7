"""One exception family, so the CLI can turn any of them into one line for a person.

Every message should say which file or value is wrong, what was expected versus found, and what to do.
"""


class TinyLlamaError(Exception):
    """Base class: anything the user can fix (bad files, bad arguments, too little memory)."""


class CheckpointError(TinyLlamaError):
    """A checkpoint file is missing, corrupt, or inconsistent with itself."""


class ConfigError(TinyLlamaError):
    """config.json / quantize_config.json is missing a field or holds an unsupported value."""


class QuantError(TinyLlamaError):
    """GPTQ tensors disagree with each other or with the quantization config."""


class TokenizerError(TinyLlamaError):
    """The tokenizer files are missing or a token id cannot be represented."""


class GenerationError(TinyLlamaError):
    """Bad generation input: empty or too-long prompt, ids out of range, nonsense sampling values."""


class MemoryBudgetError(TinyLlamaError):
    """The memory budget cannot hold what the model needs."""


# -- errors of two kinds at once -----------------------------------------------------------------------------
# When two files disagree, or a file belongs to two parts of the system, the error is both kinds: callers can
# catch whichever they think of first (a config value that contradicts a tensor is a ConfigError and a
# CheckpointError).

class ConfigMismatchError(ConfigError, CheckpointError):
    """config.json (or quantize_config.json) and the checkpoint's tensors disagree."""


class GPTQTensorError(QuantError, CheckpointError):
    """A GPTQ-packed tensor in the checkpoint is missing, or has the wrong dtype."""


class GPTQMismatchError(QuantError, ConfigMismatchError):
    """A GPTQ-packed tensor's shape disagrees with config.json or quantize_config.json."""


class TokenizerConfigError(TokenizerError, ConfigError):
    """tokenizer_config.json, added_tokens.json or special_tokens_map.json holds a value of the wrong type."""


class GenerationConfigError(ConfigError, GenerationError):
    """generation_config.json holds a value of the wrong type or range."""
