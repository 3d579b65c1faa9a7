"""Where a prefill's time goes: every step of the forward pass timed, and the matmuls split into their parts.

    tinyllama-ref bench prefill-profile CKPT [--tokens 64,512] [--repetitions 3] [--gptq-mode exact] [--json]

One warm-up pass per length (compiles, repacks), then --repetitions timed passes from an empty cache; the
figures are per pass, medians over the repetitions. Categories (wall seconds on the calling thread):
  matmul q/k/v/o/gate/up/down/lm_head  each linear, with its GFLOP/s (2 x rows x weights / time)
  rms_norm, rope, swiglu, attention    the steps between the matmuls (attention: scores, softmax, values)
  other                                what is left of the pass: residual adds, reshapes, KV cache writes,
                                       the embedding gather, Python
Inside the GPTQ prefill matmuls the slab workers (kernels/generic/slabs.py) are timed too, in thread-seconds summed
over the workers: "dequantize" (codes -> float32 slab), "blas" (slab @ x), and "idle" = threads x wall -
busy, the time a worker waited (for the other, for the GIL, or for the OS when a core is taken).
"""

import argparse
import json
import statistics
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Timers:
    """Seconds per category, added from any thread."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.flops = defaultdict(float)
        self.lock = threading.Lock()

    def add(self, name, seconds, flops=0.0):
        with self.lock:
            self.seconds[name] += seconds
            self.calls[name] += 1
            self.flops[name] += flops

    def timed(self, name, fn, flops=None):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t, flops(*args) if flops else 0.0)
        return wrapper


@contextmanager
def instrumented(model, timers):
    """Wrap the forward pass's steps with timers for the duration (module attributes, restored after)."""
    from .. import attention, model as model_mod, quant
    from ..kernels import gptq
    import numba
    patches = []

    def patch(obj, attr, new):
        patches.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, new)

    patch(model_mod, "rms_norm", timers.timed("rms_norm", model_mod.rms_norm))
    patch(model_mod, "swiglu", timers.timed("swiglu", model_mod.swiglu))
    patch(attention, "apply_rope", timers.timed("rope", attention.apply_rope))
    patch(attention, "attend_by_heads", timers.timed("attention", attention.attend_by_heads))
    patch(attention, "attend", timers.timed("attention", attention.attend))

    original_call = quant.GPTQLinear.__call__

    def gptq_call(self, x):
        t = time.perf_counter()
        y = original_call(self, x)
        name = next((p.split("_")[0] for p in PROJECTIONS if self.name.endswith(p)), "other_linear")
        timers.add(f"matmul {name}", time.perf_counter() - t, 2.0 * x.shape[0] * self.in_features * self.out_features)
        return y
    patch(quant.GPTQLinear, "__call__", gptq_call)

    head = model.lm_head
    original_head = type(head).__call__

    def head_call(self, x):
        t = time.perf_counter()
        y = original_head(self, x)
        timers.add("matmul lm_head", time.perf_counter() - t, 2.0 * x.shape[0] * x.shape[1] * y.shape[1])
        return y
    patch(type(head), "__call__", head_call)

    patch(gptq, "dequantize_slab", timers.timed("  slab dequantize", gptq.dequantize_slab))
    patch(gptq, "dequantize_slab_inplace", timers.timed("  slab dequantize", gptq.dequantize_slab_inplace))
    original_run_slabs = gptq.run_slabs

    def run_slabs_timed(n_out, columns, work):
        busy = []

        def timed_work(j0, j1, worker):
            t = time.perf_counter()
            work(j0, j1, worker)
            busy.append(time.perf_counter() - t)
        t = time.perf_counter()
        original_run_slabs(n_out, columns, timed_work)
        wall = time.perf_counter() - t
        threads = min(numba.get_num_threads(), -(-n_out // columns))
        timers.add("  slab work (dequantize + BLAS or AMX tiles)", sum(busy))
        timers.add("  slab idle", max(0.0, threads * wall - sum(busy)))
    patch(gptq, "run_slabs", run_slabs_timed)
    try:
        yield
    finally:
        for obj, attr, old in reversed(patches):
            setattr(obj, attr, old)


def profile(model, tokens=(64, 512), repetitions=3, seed=0):
    """{tokens: {"pass_s", "categories": {name: {"s", "share", "calls", "gflops"}}}} (medians per pass)."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    out = {}
    for n in tokens:
        ids = [cfg.bos_token_id] + rng.integers(3, cfg.vocab_size, n - 1).tolist()
        with model.new_cache(1, n) as cache:                     # warm-up: compile, repack, allocate
            model.forward([np.asarray(ids)], cache, [0])
        runs = []
        for _ in range(repetitions):
            timers = Timers()
            with model.new_cache(1, n) as cache, instrumented(model, timers):
                t = time.perf_counter()
                model.forward([np.asarray(ids)], cache, [0])
                wall = time.perf_counter() - t
            runs.append((wall, timers))
        wall = statistics.median(w for w, _ in runs)
        names = sorted({k for _, tm in runs for k in tm.seconds})
        cats = {}
        for name in names:
            s = statistics.median(tm.seconds.get(name, 0.0) for _, tm in runs)
            flops = runs[0][1].flops.get(name, 0.0)
            cats[name] = {"s": round(s, 4), "share": round(s / wall, 4), "calls": runs[0][1].calls.get(name, 0),
                          "gflops": round(flops / s / 1e9, 1) if flops and s else None}
        top = sum(v["s"] for k, v in cats.items() if not k.startswith("  "))
        cats["other"] = {"s": round(wall - top, 4), "share": round((wall - top) / wall, 4), "calls": None,
                         "gflops": None}
        out[n] = {"pass_s": round(wall, 4), "tokens_per_s": round(n / wall, 2), "categories": cats}
    return out


def format_profile(result):
    lines = []
    for n, r in result.items():
        lines.append(f"\npp{n}: {r['pass_s']} s per pass, {r['tokens_per_s']} tokens/s")
        lines.append("| step | s | share | calls | GFLOP/s |")
        lines.append("|---|---|---|---|---|")
        for name, c in r["categories"].items():
            lines.append(f"| {name} | {c['s']} | {100 * c['share']:.1f}% | {c['calls'] or ''} | "
                         f"{c['gflops'] or ''} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tinyllama-ref bench prefill-profile", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--tokens", default="64,512", help="prompt lengths, comma-separated (default 64,512)")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--gptq-mode", default="exact", choices=("exact", "int8"))
    ap.add_argument("--backend", default="numba", choices=("numba", "numpy"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        tokens = tuple(int(t) for t in a.tokens.split(",") if t.strip())
        if not tokens or min(tokens) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--tokens must be positive integers separated by commas, got {a.tokens!r}")
    from .. import load
    from ..errors import TinyLlamaError
    from .bench_generate import blas_info
    try:
        model = load(a.checkpoint, backend=a.backend, gptq_mode=a.gptq_mode)
        result = profile(model, tokens, a.repetitions)
    except TinyLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if a.json:
        print(json.dumps({"checkpoint": a.checkpoint, "gptq_mode": a.gptq_mode, **blas_info(),
                          "profile": {str(k): v for k, v in result.items()}}, indent=1))
    else:
        info = blas_info()
        print(f"{a.checkpoint}: gptq_mode {a.gptq_mode}, BLAS {info['blas']} {info['blas_kernel']}")
        print(format_profile(result))


if __name__ == "__main__":
    main()
