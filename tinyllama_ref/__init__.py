"""tinyllama-ref: a readable Llama-2 inference engine in NumPy and Numba.

    import tinyllama_ref
    model = tinyllama_ref.load("path/to/checkpoint", backend="numba")   # or "numpy", the reference
    model.logits([1, 306, 4658])                   # float32 [3, vocab], teacher-forced
    model.generate([1, 306, 4658], max_new_tokens=16)   # the new token ids
"""

import os

# Numba's OpenMP workers spin after each parallel region by default; on a 2-core machine that steals the
# core BLAS (and the next region) needs: a 117 MB sum took 8 ms instead of 3 ms. It must be set before the
# first parallel region runs, so it is set here, on import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import (  # noqa: E402CheckpointError, ConfigError, GenerationError, MemoryBudgetError, QuantError,
                     TinyLlamaError, TokenizerError)

__version__ = "0.1.0"


def load(path, backend="numba", max_memory=None, quiet=True):
    """Open a checkpoint directory (dense or GPTQ safetensors) as a Model."""
    from .model import Model
    return Model(path, backend=backend, max_memory=max_memory, quiet=quiet)


__all__ = ["load", "TinyLlamaError", "CheckpointError", "ConfigError", "GenerationError", "QuantError",
           "TokenizerError", "MemoryBudgetError", "__version__"]
