"""Numba kernels for tinyllama_ref (installed as tinyllama_ref.kernels).

cpu.py names this CPU's tier; table.py says which kernel runs for a layer at that tier; gptq.py runs it. The
folders hold the kernels of one tier each (generic/, avx2/, avx512/, vnni/, amx/); llvm.py the IR helpers.
TINYLLAMA_CPU=<tier> in the environment caps the tier, read here before any kernel compiles.
"""

from .cpu import _cap_from_environment

_cap_from_environment()
