"""End-to-end generation benchmark: load, prefill, decode, disk traffic and memory, against the I/O bound.

For each batch size the same model runs a greedy generation on random prompts. Reported per configuration:
load seconds, prefill tokens/s, decode seconds per pass (one token for every sequence), tokens/s, bytes read
from disk per pass (/proc/self/io read_bytes: what really came from the block device), peak RSS, the memory
and disk bandwidth measured in the same run, and the bound they imply for one decode pass:

    bound = bytes that must stream per pass / disk bandwidth + resident bytes / memory bandwidth
"""

import json
import statistics
import time

import numpy as np

from ..memory import human, peak_rss


def _io_read_bytes():
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def bench(checkpoint, batches=(1, 8, 32), prompt_tokens=64, new_tokens=8, backend="numba", max_memory=None,
          seed=0):
    from .. import load
    from .bandwidth import disk_read_gbps
    from ..generate import run
    from ..kernels.bandwidth import memory_read_gbps
    from ..sampling import Sampler, SamplingParams
    t = time.perf_counter()
    model = load(checkpoint, backend=backend, max_memory=max_memory)
    load_s = time.perf_counter() - t
    src = model.layers
    biggest = max(model.ckpt.files, key=lambda p: model.ckpt.files[p].size)
    mem_gbps = memory_read_gbps()
    disk_gbps = disk_read_gbps(biggest, 2**30)
    rng = np.random.default_rng(seed)
    records = []
    # Warm-up: compiles kernels and builds resident layers, so the timings below are steady state.
    run(model, [[model.cfg.bos_token_id, 3, 4, 5]], 2, Sampler(SamplingParams(temperature=0.0)), set())
    for b in batches:
        prompts = [[model.cfg.bos_token_id] + rng.integers(3, model.cfg.vocab_size, prompt_tokens - 1).tolist()
                   for _ in range(b)]
        io0, streamed0 = _io_read_bytes(), src.bytes_streamed
        outs = run(model, prompts, new_tokens, Sampler(SamplingParams(temperature=0.0)), set())
        io1, streamed1 = _io_read_bytes(), src.bytes_streamed
        prefill_s = outs[0].prefill_seconds
        per_pass = outs[0].token_seconds                  # one pass over the weights decodes all b sequences
        passes = len(per_pass) + 1                        # + the prefill pass
        s_pass = statistics.median(per_pass) if per_pass else float("nan")
        resident = src.resident_bytes() + model.lm_head.nbytes
        streamed = src.streamed_bytes_per_pass()
        bound = streamed / (disk_gbps * 1e9) + resident / (mem_gbps * 1e9)
        weights = sum(src.file_bytes) + model.lm_head.nbytes
        records.append({
            "checkpoint": checkpoint, "backend": backend, "batch": b, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "load_s": round(load_s, 3),
            "prefill_tokens_per_s": round(b * prompt_tokens / prefill_s, 2),
            "decode_s_per_pass": round(s_pass, 4), "decode_tokens_per_s": round(b / s_pass, 3),
            "weights_gbps": round(weights / s_pass / 1e9, 2),
            "disk_bytes_per_pass": int((io1 - io0) / passes),
            "streamed_bytes_per_pass": int((streamed1 - streamed0) / passes),
            "resident_layers": src.n_resident, "n_layers": src.n_layers,
            "peak_rss_bytes": peak_rss(), "budget_bytes": src.budget,
            "memory_gbps": round(mem_gbps, 2), "disk_gbps": round(disk_gbps, 2),
            "bound_s_per_pass": round(bound, 4), "ratio_to_bound": round(s_pass / bound, 3),
            "weights_fraction_of_memory_bw": round(weights / s_pass / 1e9 / mem_gbps, 3),
        })
    return records


def format_table(records):
    rows = ["| batch | prefill tok/s | decode s/pass | tok/s | weights GB/s | disk MB/pass | peak RSS | "
            "bound s/pass | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rows.append(f"| {r['batch']} | {r['prefill_tokens_per_s']} | {r['decode_s_per_pass']} | "
                    f"{r['decode_tokens_per_s']} | {r['weights_gbps']} | {r['disk_bytes_per_pass'] / 1e6:.0f} | "
                    f"{human(r['peak_rss_bytes'])} | {r['bound_s_per_pass']} | {r['ratio_to_bound']} |")
    r = records[0]
    rows.append(f"\nload {r['load_s']} s; {r['resident_layers']}/{r['n_layers']} layers resident; budget "
                f"{human(r['budget_bytes'])}; memory {r['memory_gbps']} GB/s, disk {r['disk_gbps']} GB/s "
                "measured in this run")
    return "\n".join(rows)


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--backend", default="numba", choices=["numba", "numpy"])
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    recs = bench(a.checkpoint, [int(x) for x in a.batch.split(",")], a.prompt_tokens, a.new_tokens, a.backend,
                 a.max_memory)
    print("\n".join(json.dumps(r) for r in recs) if a.json else format_table(recs))
