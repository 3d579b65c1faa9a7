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
