"""Kernels shaped for AVX-512's 32 zmm registers (no VNNI needed)."""
