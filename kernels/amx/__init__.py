"""Kernels on AMX tiles (Intel Sapphire Rapids and later)."""
