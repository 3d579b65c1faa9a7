"""Measuring the engine: verify.py compares every layer with transformers; bench_kernels.py and
bench_generate.py time the kernels and whole passes; bandwidth.py and inspect.py say what this machine and a
checkpoint will cost."""
