#!/usr/bin/env python
"""GPTQ kernel benchmark (same as `tinyllama-ref bench kernels`): python tools/bench_kernels.py [--json] [--quick]"""
from tinyllama_ref.measure.bench_kernels import main

if __name__ == "__main__":
    main()
