"""tinyllama-ref: a readable Llama-2 inference engine in NumPy and Numba.

    import tinyllama_ref
    model = tinyllama_ref.load("path/to/checkpoint", backend="numba")   # or "numpy", the reference
    model.logits([1, 306, 4658])                   # float32 [3, vocab], teacher-forced
    model.generate([1, 306, 4658], max_new_tokens=16)   # the new token ids
"""

import os

# Numba's parallel kernels run on OpenMP (GNU libgomp) workers. By default they spin for a long time after
# each parallel region; on a 2-core machine that steals the cores BLAS needs (a 117 MB sum took 8 ms instead
# of 3 ms, prefill was up to 10x slower). OMP_WAIT_POLICY=PASSIVE alone puts them to sleep at once, and waking
# them costs 60-90 us per kernel launch on this VM, where a decode pass launches hundreds of kernels a few
# microseconds apart. GOMP_SPINCOUNT (which takes precedence over the policy) lets them spin about 0.3-1 ms:
# back-to-back launches cost ~2 us, and a BLAS call that comes later finds them asleep. Measured: empty
# parallel launch 62 -> 1.8 us; 7B 4-bit decode 0.156 -> 0.119 s/pass (medians of 3 alternating runs);
# prefill unchanged. Both must be set before the first parallel region, so they are set here, on import
# (every tinyllama_ref.kernels module imports this package first). Values the user set are kept.
# This is the one setting the package makes through the environment: libgomp reads these variables once,
# when its first parallel region starts, so no parameter of load() could still change them. Every other
# setting (backend, budget, GPTQ mode, threads, CPU tier) is a parameter of load().
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

from .errors import (CheckpointError, ConfigError, GenerationError, MemoryBudgetError,  # noqa: E402
                     QuantError, TinyLlamaError, TokenizerError)
from .model import Model  # noqa: E402
from .text import TextModel  # noqa: E402

__version__ = "0.1.0"


def load(path, backend="numba", max_memory=None, gptq_mode="exact", quiet=True, threads=None, cpu=None):
    """Open a checkpoint directory (dense or GPTQ safetensors) as a TextModel: the forward pass plus its
    tokenizer.

    backend: "numba" (fast kernels) or "numpy" (the readable reference). max_memory: a budget such as
    "20GB" (default: 85% of available memory); layers that do not fit are streamed from disk.
    gptq_mode: "exact" (float32, the default) or "int8" (opt-in approximate activations; AVX2 and above).
    cpu: the CPU tier whose kernels run (kernels/cpu.py: "generic", "avx2", "avx512", "vnni", "amx"); None is
    this process's tier (the CPU's, or TINYLLAMA_CPU's cap); a lower one chooses that tier's kernels.
    threads: "auto" (the default, also from $TINYLLAMA_THREADS) picks each decode pass's thread count from
    how fast recent passes ran (threads.py: one thread beats two when another process holds a core); a
    number fixes it.
    """
    return TextModel(Model(path, backend=backend, max_memory=max_memory, gptq_mode=gptq_mode, quiet=quiet,
                           threads=threads, cpu=cpu))


__all__ = ["load", "Model", "TextModel", "TinyLlamaError", "CheckpointError", "ConfigError", "GenerationError", "QuantError",
           "TokenizerError", "MemoryBudgetError", "__version__"]
