#!/usr/bin/env python
"""Decode with one core taken: ours against llama.cpp's better thread setting, in one run.

A busy process (a Python loop pinned to the last core with taskset) runs for the whole measurement, as
another program would on a laptop or a shared server. Under it, alternating --rounds times:
  llama.cpp  `llama-bench -p 0 -n 16 -t 1` and `-t 2` (tokens/s; the better of the two is the bar)
  ours       `tinyllama-ref bench generate -p '' -n 16` with --threads auto (the default), and with 1 and 2
Both OpenBLAS variables are unset for both programs, as on a user's machine. Prints the medians and the
ratio of ours (auto) to llama.cpp's better setting. The busy process is stopped at the end, also on error.

    python tools/bench_busy_core.py /tmp/perf7b /tmp/lcb/7b-q4_0.gguf [--rounds 2] [--llama-bench PATH] [--int8]

--int8 adds ours with the opt-in --gptq-mode int8 (int8 activations, VNNI), auto threads.
"""

import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import find_llama_bench, parser, run_llama_bench, run_ours   # noqa: E402


def tg16(checkpoint, threads, reps, mode="exact", tier=None):
    rows, rec = run_ours(checkpoint, "", "16", reps, mode, ("--threads", threads), tier)
    return rows["tg16"], rec.get("thread_choice")


def main():
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--int8", action="store_true", help="also ours with --gptq-mode int8 (auto threads)")
    a = ap.parse_args()
    binary = a.llama_bench or find_llama_bench(a.tier)
    core = str(os.cpu_count() - 1)
    busy = subprocess.Popen(["taskset", "-c", core, sys.executable, "-c", "while True: pass"])
    results = {"llama.cpp -t 1": [], "llama.cpp -t 2": [], "ours auto": [], "ours 1": [], "ours 2": []}
    if a.int8:
        results["ours int8 auto"] = []
    choices = []
    try:
        for _ in range(a.rounds):
            for t in (1, 2):
                rows = run_llama_bench(binary, a.gguf, t, "0", "16", a.repetitions)
                results[f"llama.cpp -t {t}"].append(rows["tg16"])
            for t in ("auto", "1", "2"):
                tps, choice = tg16(a.checkpoint, t, a.repetitions, tier=a.tier)
                results[f"ours {t}"].append(tps)
                if t == "auto":
                    choices.append(choice)
            if a.int8:
                results["ours int8 auto"].append(tg16(a.checkpoint, "auto", a.repetitions, "int8", a.tier)[0])
    finally:
        busy.kill()
        busy.wait()
    med = {k: statistics.median(v) for k, v in results.items()}
    bar = max(med["llama.cpp -t 1"], med["llama.cpp -t 2"])
    print(f"decode tg16 with core {core} busy (medians of {a.rounds} alternating rounds x {a.repetitions} reps)")
    print("| run | tokens/s | samples | of llama.cpp's better |")
    print("|---|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {med[k]:.2f} | {', '.join(f'{s:.2f}' for s in v)} | {med[k] / bar:.2f} |")
    print(f"ours auto chose: {'; '.join(str(c) for c in choices)}")
    print(json.dumps({"busy_core": core, "results": results, "choices": choices}))


if __name__ == "__main__":
    main()
