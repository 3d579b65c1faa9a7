#!/usr/bin/env python
"""Rewrite the generated GEMV passes in kernels/generic/gptq_passes.py from their generator.

The passes are long unrolled loops (one line per code) written by gptq_passes.pass_source(). They are checked in as ordinary source, not exec'd at import, because
Numba's on-disk cache keys a function by its source file and line (exec'd code cannot be cached, so every
process would recompile them), and because a traceback or a profile then points at a real line. The test
test_unrolled_passes_match_their_generator fails when the two drift apart; after changing a generator run

    python tools/regenerate_passes.py            # rewrite the passes in place
    python tools/regenerate_passes.py --check    # exit 1 if any pass differs from its generator
"""

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _targets():
    from tinyllama_ref.kernels.generic import gptq_passes
    segments = [(f"_pass_b{b}_w{w}", gptq_passes.pass_source(b, w))
                for b, passes in gptq_passes.PASSES.items() for w in passes]
    return [(os.path.join(ROOT, "kernels", "generic", "gptq_passes.py"), segments)]


def regenerate(text, functions):
    """text with each named function (its decorator line up to the next two blank lines) replaced."""
    for name, source in functions:
        m = re.search(rf"^@njit\([^\n]*\)\ndef {name}\(.*?(?=\n\n\n|\Z)", text, flags=re.S | re.M)
        if m is None:
            raise SystemExit(f"{name} not found: add a stub with its decorator, then run this again")
        end = "\n" if m.end() == len(text) else ""     # the last function of a file keeps its newline
        text = text[:m.start()] + source.rstrip("\n") + end + text[m.end():]
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only report; exit 1 if a file would change")
    args = ap.parse_args()
    stale = []
    for path, functions in _targets():
        with open(path) as f:
            old = f.read()
        new = regenerate(old, functions)
        if new != old:
            stale.append(path)
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
    verb = "differ from their generators" if args.check else "rewritten"
    print(f"{len(stale)} file(s) {verb}: {', '.join(os.path.relpath(p, ROOT) for p in stale) or 'none'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
