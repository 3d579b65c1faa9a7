"""Kernels that need AVX512-VNNI's vpdpbusd (integer dot products of bytes)."""
