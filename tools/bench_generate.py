#!/usr/bin/env python
"""Generation benchmark (same as `tinyllama-ref bench generate`): python tools/bench_generate.py CKPT --json"""
from tinyllama_ref.measure.bench_generate import main

if __name__ == "__main__":
    main()
