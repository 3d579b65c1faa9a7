"""End-to-end benchmark as a user runs it: llama-bench-shaped rows, then (with --batch) batched decode.

Default: rows shaped like llama.cpp's `llama-bench -p 64,512 -n 16`, so the two can be read side by side:
  ppN   prompt processing: one forward pass over N random prompt tokens from an empty cache, tokens/s
  tgN   text generation: N decode passes of one token each after a one-token prompt, tokens/s
each the median of --repetitions runs, with what the same run measured of the machine: the memory read
bandwidth (measure/bandwidth.py) and the float32 GEMM rate of the BLAS NumPy uses (a [512, dim] x [dim, hidden]
product), so a ppN row also reads as a fraction of BLAS (GEMM GFLOP/s: 2 x tokens x linear weights / time) and a
tgN row as a fraction of the bandwidth (weights GB/s: packed bytes of every layer and the head per token).
Also reported: the BLAS library and kernel in use (threadpoolctl; OPENBLAS_CORETYPE forces the kernel), the
load average before and after, the load time, and (--fresh) load time and time to first token of a new
process with the Numba cache as it is ("warm") and, with --cold, an empty one ("cold": what a first run pays).

--batch 1,8,32: for each batch size a greedy generation on random prompts, reported per configuration:
load seconds, prefill tokens/s, decode seconds per pass (one token for every sequence), tokens/s, bytes read
from disk per pass (/proc/self/io read_bytes: what really came from the block device; "?" without /proc),
peak RSS, the memory and disk bandwidth measured in the same run (the disk read sequentially before the first
batch size and after each one, since a shared disk's rate wanders, and the rate the read-ahead thread got while
streaming; the best of those is used), and the bound they imply for one decode pass:

    bound = bytes that must stream per pass / disk bandwidth + resident bytes / memory bandwidth
"""

import json
import os
import statistics
import time

import numpy as np

from ..memory import human, peak_rss
from ..platform import io_read_bytes


def bench(checkpoint, batches=(1, 8, 32), prompt_tokens=64, new_tokens=8, backend="numba", max_memory=None,
          seed=0, gptq_mode="exact"):
    from .. import load
    from .bandwidth import disk_read_gbps, memory_read_gbps
    from ..generate import run
    from ..sampling import Sampler, SamplingParams
    t = time.perf_counter()
    model = load(checkpoint, backend=backend, max_memory=max_memory, gptq_mode=gptq_mode)
    load_s = time.perf_counter() - t
    src = model.layers
    biggest = max(model.ckpt.files, key=lambda p: model.ckpt.files[p].size)
    mem_gbps = memory_read_gbps()
    disk_probes = [disk_read_gbps(biggest, 2**30)]        # again after each configuration: a shared disk varies
    rng = np.random.default_rng(seed)
    records = []
    # Warm-up: compiles kernels and builds resident layers, so the timings below are steady state.
    run(model, [[model.cfg.bos_token_id, 3, 4, 5]], 2, Sampler(SamplingParams(temperature=0.0)), set())
    for b in batches:
        prompts = [[model.cfg.bos_token_id] + rng.integers(3, model.cfg.vocab_size, prompt_tokens - 1).tolist()
                   for _ in range(b)]
        io0, streamed0, reading0 = io_read_bytes(), src.bytes_streamed, src.seconds_reading   # None: no /proc
        outs = run(model, prompts, new_tokens, Sampler(SamplingParams(temperature=0.0)), set())
        io1, streamed1, reading1 = io_read_bytes(), src.bytes_streamed, src.seconds_reading
        prefill_s = outs[0].prefill_seconds
        per_pass = outs[0].token_seconds                  # one pass over the weights decodes all b sequences
        passes = len(per_pass) + 1                        # + the prefill pass
        s_pass = statistics.median(per_pass) if per_pass else float("nan")
        resident = src.resident_bytes() + model.lm_head.nbytes
        streamed = src.streamed_bytes_per_pass()
        streaming_gbps = (streamed1 - streamed0) / (reading1 - reading0) / 1e9 if reading1 > reading0 else 0.0
        if streamed:
            disk_probes.append(disk_read_gbps(biggest, 2**30))
        # The disk's best in this run, the strictest bound: a plain sequential read (the probes), or what the
        # read-ahead thread got while it streamed the layers (larger requests; often faster).
        disk_gbps = max(disk_probes + [streaming_gbps])
        bound = streamed / (disk_gbps * 1e9) + resident / (mem_gbps * 1e9)
        weights = sum(src.file_bytes) + model.lm_head.nbytes
        records.append({
            "checkpoint": checkpoint, "backend": backend, "batch": b, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "load_s": round(load_s, 3),
            "prefill_tokens_per_s": round(b * prompt_tokens / prefill_s, 2),
            "decode_s_per_pass": round(s_pass, 4), "decode_tokens_per_s": round(b / s_pass, 3),
            "weights_gbps": round(weights / s_pass / 1e9, 2),
            "disk_bytes_per_pass": None if io0 is None or io1 is None else int((io1 - io0) / passes),
            "streamed_bytes_per_pass": int((streamed1 - streamed0) / passes),
            "resident_layers": src.n_resident, "n_layers": src.n_layers,
            "peak_rss_bytes": peak_rss(), "budget_bytes": src.budget,
            "memory_gbps": round(mem_gbps, 2), "disk_gbps": round(disk_gbps, 2),
            "disk_gbps_probes": [round(v, 2) for v in disk_probes],
            "disk_gbps_streaming": round(streaming_gbps, 2),
            "bound_s_per_pass": round(bound, 4), "ratio_to_bound": round(s_pass / bound, 3),
            "weights_fraction_of_memory_bw": round(weights / s_pass / 1e9 / mem_gbps, 3),
        })
    return records


def _mb(n):
    return "?" if n is None else f"{n / 1e6:.0f}"        # None: this OS does not say (no /proc/self/io)


def format_table(records):
    rows = ["| batch | prefill tok/s | decode s/pass | tok/s | weights GB/s | disk MB/pass | peak RSS | "
            "bound s/pass | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rows.append(f"| {r['batch']} | {r['prefill_tokens_per_s']} | {r['decode_s_per_pass']} | "
                    f"{r['decode_tokens_per_s']} | {r['weights_gbps']} | {_mb(r['disk_bytes_per_pass'])} | "
                    f"{human(r['peak_rss_bytes'])} | {r['bound_s_per_pass']} | {r['ratio_to_bound']} |")
    r = records[0]
    rows.append(f"\nload {r['load_s']} s; {r['resident_layers']}/{r['n_layers']} layers resident; budget "
                f"{human(r['budget_bytes'])}; memory {r['memory_gbps']} GB/s, disk {r['disk_gbps']} GB/s "
                f"measured in this run (the best of sequential reads of {', '.join(map(str, records[-1]['disk_gbps_probes']))} "
                f"GB/s before and after each batch size, and of the read-ahead's "
                f"{', '.join(str(r['disk_gbps_streaming']) for r in records)} GB/s while streaming)")
    return "\n".join(rows)


def blas_info():
    """The BLAS NumPy calls, as threadpoolctl sees it, and the OpenBLAS variables that force its kernel."""
    try:
        from threadpoolctl import threadpool_info
        infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        infos = []
    infos.sort(key=lambda i: "numpy" not in str(i.get("filepath", "")))    # NumPy's own first
    info = infos[0] if infos else {}
    return {"blas": info.get("internal_api", "unknown"), "blas_version": info.get("version"),
            "blas_kernel": info.get("architecture"), "blas_threads": info.get("num_threads"),
            "openblas_env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}}


def blas_gemm_gflops(dim, hidden, rows=512, repeats=5):
    """float32 x [rows, dim] @ W [dim, hidden] with NumPy's BLAS on all threads, GFLOP/s (median)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    w = rng.standard_normal((dim, hidden), dtype=np.float32)
    x @ w
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - t)
    return 2.0 * rows * dim * hidden / statistics.median(times) / 1e9


def linear_weights(cfg):
    """Weights of every decoder-layer linear (the multiply-adds per token in the matmuls)."""
    per_layer = cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim \
        + 3 * cfg.dim * cfg.hidden_dim
    return cfg.n_layers * per_layer


def llama_bench_rows(model, prompt_sizes=(64, 512), gen_tokens=(16,), repetitions=3, seed=0):
    """The ppN / tgN rows (see the module docstring) as dicts, each with its samples and median."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    weights = sum(model.layers.file_bytes) + model.lm_head.nbytes
    rows = []

    def one_pass(ids_list, cache):
        t = time.perf_counter()
        model.forward([np.asarray(ids_list)], cache, [0])
        return time.perf_counter() - t

    for n in prompt_sizes:
        samples = []
        for _ in range(repetitions):
            ids = [cfg.bos_token_id] + rng.integers(3, cfg.vocab_size, n - 1).tolist()
            with model.new_cache(1, n) as cache:
                samples.append(one_pass(ids, cache))
        s = statistics.median(samples)
        rows.append({"test": f"pp{n}", "tokens": n, "seconds": round(s, 4), "tokens_per_s": round(n / s, 2),
                     "samples_s": [round(v, 4) for v in samples],
                     "gemm_gflops": round(2.0 * n * linear_weights(cfg) / s / 1e9, 1)})
    for n in [g for g in gen_tokens if g > 0]:      # -n 0, as with llama-bench: no decode row
        samples = []
        for _ in range(repetitions):
            with model.new_cache(1, n + 1) as cache:
                one_pass([cfg.bos_token_id], cache)
                tok = int(rng.integers(3, cfg.vocab_size))
                samples.append(sum(one_pass([tok], cache) for _ in range(n)))
        s = statistics.median(samples)
        rows.append({"test": f"tg{n}", "tokens": n, "seconds": round(s, 4), "tokens_per_s": round(n / s, 2),
                     "samples_s": [round(v, 4) for v in samples],
                     "weights_gbps": round(weights * n / s / 1e9, 2)})
    return rows


FRESH_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import tinyllama_ref
from tinyllama_ref.kernels.compile_note import compile_seconds
t1 = time.perf_counter()
m = tinyllama_ref.load(sys.argv[1], backend=sys.argv[2], gptq_mode=sys.argv[3])
t2 = time.perf_counter()
m.generate([m.cfg.bos_token_id, 5, 6, 7, 8], max_new_tokens=1, temperature=0.0)
t3 = time.perf_counter()
print(json.dumps({"import_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3), "first_token_s": round(t3 - t2, 3),
                  "start_to_first_token_s": round(t3 - t0, 3), "compile_s": round(compile_seconds(), 3)}))
"""


def fresh_process(checkpoint, backend, gptq_mode, cold):
    """Load time and time to first token (a 5-token prompt) in a new Python process; cold: Numba cache empty."""
    import subprocess
    import sys
    import tempfile
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache_dir:
        if cold:
            env["NUMBA_CACHE_DIR"] = cache_dir
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", FRESH_CHILD, checkpoint, backend, gptq_mode], env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t
    if run.returncode != 0:
        return {"cache": "cold" if cold else "warm", "error": run.stderr.strip().splitlines()[-1:]}
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return dict(out, cache="cold" if cold else "warm", process_wall_s=round(wall, 3))


def bench_llama_shaped(checkpoint, prompt_sizes=(64, 512), gen_tokens=(16,), repetitions=3, backend="numba",
                       gptq_mode="exact", max_memory=None, fresh=False, cold=False):
    """One record: the machine (BLAS, bandwidth, GEMM rate, load), the model, and the ppN / tgN rows."""
    import numba
    from .. import load
    from ..kernels import cpu
    from .bandwidth import memory_read_gbps
    from ..kernels.compile_note import compile_seconds
    load_before = os.getloadavg()
    starts = []
    if fresh:
        starts.append(fresh_process(checkpoint, backend, gptq_mode, cold=False))
        if cold:
            starts.append(fresh_process(checkpoint, backend, gptq_mode, cold=True))
    t = time.perf_counter()
    model = load(checkpoint, backend=backend, max_memory=max_memory, gptq_mode=gptq_mode)
    load_s = time.perf_counter() - t
    t, compiled = time.perf_counter(), compile_seconds()
    with model.new_cache(1, 40) as cache:     # first passes: compile (if the cache is cold), build the layers
        model.forward([np.arange(1, 35) % model.cfg.vocab_size], cache, [0])
        model.forward([np.array([5])], cache, [0])
    warmup_s = time.perf_counter() - t
    compile_s = compile_seconds() - compiled  # of the first passes: Numba compiling, apart from running
    mem_gbps = memory_read_gbps()
    gemm = blas_gemm_gflops(model.cfg.dim, model.cfg.hidden_dim)
    rows = llama_bench_rows(model, prompt_sizes, gen_tokens, repetitions)
    for r in rows:
        if "gemm_gflops" in r:
            r["fraction_of_blas"] = round(r["gemm_gflops"] / gemm, 3)
        if "weights_gbps" in r:
            r["fraction_of_memory_bw"] = round(r["weights_gbps"] / mem_gbps, 3)
    weights = sum(model.layers.file_bytes) + model.lm_head.nbytes
    return {"checkpoint": checkpoint, "backend": backend, "gptq_mode": gptq_mode,
            "cpu_tier": (model.cpu or cpu.process_tier()) if backend == "numba" else "numpy",
            "cpu_tier_note": cpu.describe(), "cpu_name": cpu.host_name(),
            "fast_subnormals": bool(cpu.fast_subnormals()) if backend == "numba" else None,
            "threads": numba.get_num_threads(), "thread_choice": model.threads.describe(),
            "weights_bytes": int(weights),
            "layers_resident": model.layers.n_resident, "n_layers": model.layers.n_layers,
            "load_s": round(load_s, 3), "first_passes_s": round(warmup_s, 3),
            "first_passes_compile_s": round(compile_s, 3), "fresh_process": starts,
            "memory_gbps": round(mem_gbps, 2), "blas_gemm_gflops": round(gemm, 1), **blas_info(),
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()], "rows": rows}


def format_llama_shaped(rec):
    """llama-bench's markdown table, plus the columns that say what the machine could do in the same run."""
    name = os.path.basename(os.path.normpath(rec["checkpoint"]))
    lines = [f"CPU {rec.get('cpu_name')}, kernels of tier {rec.get('cpu_tier')} ({rec.get('cpu_tier_note')})", "",
             "| model | size | backend | mode | threads | test | t/s | GEMM GFLOP/s | weights GB/s | of machine |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        spread = f"{r['tokens'] / max(r['samples_s']):.2f}-{r['tokens'] / min(r['samples_s']):.2f}"   # slowest-fastest
        frac = r.get("fraction_of_blas", r.get("fraction_of_memory_bw"))
        lines.append(f"| {name} | {human(rec['weights_bytes'])} | {rec['backend']} | {rec['gptq_mode']} | "
                     f"{rec['threads']} | {r['test']} | {r['tokens_per_s']} ({spread}) | {r.get('gemm_gflops', '')} | "
                     f"{r.get('weights_gbps', '')} | {frac} |")
    env = rec["openblas_env"] or "none"
    lines.append(f"\nmachine, same run: BLAS {rec['blas']} {rec['blas_version']} kernel {rec['blas_kernel']} "
                 f"({rec['blas_threads']} threads; OpenBLAS variables: {env}), float32 GEMM "
                 f"{rec['blas_gemm_gflops']} GFLOP/s, memory {rec['memory_gbps']} GB/s; load average "
                 f"{rec['loadavg_before'][0]} before, {rec['loadavg_after'][0]} after")
    lines.append(f"load {rec['load_s']} s, first passes {rec['first_passes_s']} s (of which compiling "
                 f"{rec.get('first_passes_compile_s')} s); {rec['layers_resident']}/"
                 f"{rec['n_layers']} layers resident; decode threads chosen: {rec.get('thread_choice')}")
    for f in rec["fresh_process"]:
        if "error" in f:
            lines.append(f"fresh process, {f['cache']} Numba cache: failed: {f['error']}")
        else:
            lines.append(f"fresh process, {f['cache']} Numba cache: import {f['import_s']} s, load {f['load_s']} s, "
                         f"first token {f['first_token_s']} s after load, of which compiling {f.get('compile_s')} s "
                         f"({f['start_to_first_token_s']} s from start)")
    return "\n".join(lines)


def _ints(text):
    return [int(v) for v in str(text).split(",") if v.strip()]


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="tinyllama-ref bench generate", description=__doc__.split("\n")[0],
                                 epilog="Measure as a user runs it: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "
                                        "tinyllama-ref bench generate CKPT (see docs/performance.md)")
    ap.add_argument("checkpoint")
    ap.add_argument("-p", "--n-prompt", default="64,512", help="prompt sizes of the ppN rows (default 64,512)")
    ap.add_argument("-n", "--n-gen", default="16", help="tokens of the tgN rows (default 16)")
    ap.add_argument("-r", "--repetitions", type=int, default=3, help="runs per row; the median is shown")
    ap.add_argument("--gptq-mode", default="exact", choices=["exact", "int8"])
    ap.add_argument("--fresh", action="store_true", help="also time load and first token in a new process")
    ap.add_argument("--cold", action="store_true", help="with --fresh: also with an empty Numba cache")
    ap.add_argument("--batch", default=None,
                    help="instead: batched decode rows for these batch sizes (e.g. 1,8,32) against the I/O bound")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="--batch: prompt length")
    ap.add_argument("--new-tokens", type=int, default=8, help="--batch: tokens per sequence")
    ap.add_argument("--backend", default="numba", choices=["numba", "numpy"])
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--threads", default=None, metavar="N|auto",
                    help="kernel threads (default auto: decode passes leave the cores other processes hold)")
    ap.add_argument("--cpu", default=None, metavar="TIER",
                    help="cap the kernels' CPU tier for this run and its --fresh children (TINYLLAMA_CPU)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from ..kernels.cpu import cap_option
    cap_option(ap, a.cpu)                             # the --fresh children cap themselves the same way
    if a.threads is not None:
        from ..errors import TinyLlamaError
        from ..threads import ENV, parse_threads
        try:
            parse_threads(a.threads, "--threads")
        except TinyLlamaError as e:
            ap.error(str(e))
        os.environ[ENV] = a.threads                   # this process and the --fresh children
    if a.batch:
        recs = bench(a.checkpoint, _ints(a.batch), a.prompt_tokens, a.new_tokens, a.backend, a.max_memory,
                     gptq_mode=a.gptq_mode)
        print("\n".join(json.dumps(r) for r in recs) if a.json else format_table(recs))
        return recs
    rec = bench_llama_shaped(a.checkpoint, _ints(a.n_prompt), _ints(a.n_gen), a.repetitions, a.backend,
                             a.gptq_mode, a.max_memory, a.fresh, a.cold)
    print(json.dumps(rec) if a.json else format_llama_shaped(rec))
    return rec
