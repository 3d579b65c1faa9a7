"""Kernels for AVX2 + FMA CPUs (16 ymm registers, no AVX-512, no VNNI): Zen 2/3, Intel desktops and laptops.

Each kernel is shaped for 16 eight-lane registers and says its register budget. Decode (split8.py, int8.py)
computes the integer dot products of kernels/vnni/ with vpmaddubsw and vpmaddwd (maddubs.py), so its results
are bit for bit those of the VNNI kernels; prefill has its own register tiles (tiles.py, int8_gemm.py).
"""
