"""Kernels for AVX2 + FMA CPUs (16 ymm registers, no AVX-512, no VNNI): Zen 2/3, Intel desktops and laptops.

Each kernel is shaped for 16 eight-lane registers and says its register budget. Exact decode (gemv.py) is the
float GEMV with each code decoded once for all rows; exact prefill has its own register tiles (tiles.py). The
int8 mode (int8.py, int8_gemm.py) computes the integer dot products of kernels/vnni/ with vpmaddubsw and
vpmaddwd (maddubs.py), so its results are bit for bit those of the VNNI kernels.
"""
