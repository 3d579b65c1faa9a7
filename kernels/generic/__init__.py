"""Kernels for every CPU: plain Numba loops and LLVM IR without target-specific intrinsics."""
