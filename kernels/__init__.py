"""Numba kernels for tinyllama_ref (installed as tinyllama_ref.kernels)."""
