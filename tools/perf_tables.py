"""Rewrite the figure tables of docs/performance.md from the benchmark records in docs/perf/*.jsonl.

    python tools/perf_tables.py            # rewrite the tables between the marker comments
    python tools/perf_tables.py --check    # exit 1 if docs/performance.md is not what the records give

Records: docs/perf/TIER.jsonl, one JSON object a line, one line per benchmark run. A line is never edited: it
is the run as it was. A rerun of the same tests on newer code replaces the lines it supersedes (git keeps them). docs/performance.md has one table per CPU tier, between
`<!-- perf-table: TIER -->` and `<!-- /perf-table -->`; this script owns what lies between them.

A line is the record `tinyllama-ref bench generate --json` printed, with these fields added:

    tier        generic | avx2 | avx512 | vnni | amx: the kernel tier that ran (bench generate's cpu_tier;
                a run capped with --cpu TIER is filed under TIER)
    date        "YYYY-MM-DD" of the run
    commit      the commit that was measured (git rev-parse --short HEAD before the run)
    machine     the CPU and memory, e.g. "2-vCPU Intel Xeon (AMX), 24 GB" (default: the record's cpu_name)
    load        optional [low, high] 1-minute load average over the run (default: loadavg_before[0] and
                loadavg_after[0] of the record, or tools/side_by_side.py's "load" list)
    model       optional: what ran, e.g. "7B 4-bit g128 act-order, resident" (default: the checkpoint's name)
    llama_cpp   optional {test: tokens/s}: tools/side_by_side.py's llama.cpp medians of the same run; the
                table shows them and the ratio ours / llama.cpp
    note        optional: one short remark shown in the table

Two record shapes are read, as bench generate prints them:
  - llama-bench-shaped (`bench generate CKPT [-p 64,512 -n 16] --json`): "gptq_mode" and "rows", a list of
    {"test": "pp64" | "tg16" | ..., "tokens_per_s": median}; each row becomes a table row.
  - batched decode (`bench generate CKPT --batch 1,8 --json`, one line per batch size): "batch",
    "decode_s_per_pass", "decode_tokens_per_s" and "ratio_to_bound" (the pass time over the I/O bound).
Every other field of the record is kept in the file and not shown. Figures copied from the older notes in
git's history carry only the fields the table shows.

Adding a run: `tinyllama-ref bench generate CKPT --json > run.json`, add tier/date/commit/machine (and the
llama.cpp medians side_by_side.py printed as its last line) with any JSON tool, append the line to
docs/perf/TIER.jsonl, run this script, commit both files.
"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERF_DIR = os.path.join(ROOT, "docs", "perf")
DOC = os.path.join(ROOT, "docs", "performance.md")
TIERS = ("generic", "avx2", "avx512", "vnni", "amx")
REQUIRED = ("tier", "date", "commit")
HEADER = ["| date | commit | machine | load | model | mode | test | tokens/s | llama.cpp tokens/s | ratio | note |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]


class RecordError(ValueError):
    pass


def read_records(perf_dir=PERF_DIR):
    """{tier: [record, ...]} in file order, every record checked."""
    out = {t: [] for t in TIERS}
    for name in sorted(os.listdir(perf_dir)):
        if not name.endswith(".jsonl"):
            continue
        path = os.path.join(perf_dir, name)
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise RecordError(f"{path}:{n}: not JSON ({e})") from None
                check_record(rec, f"{path}:{n}")
                if name != f"{rec['tier']}.jsonl":
                    raise RecordError(f"{path}:{n}: tier {rec['tier']!r} belongs in {rec['tier']}.jsonl")
                out[rec["tier"]].append(rec)
    return out


def check_record(rec, where):
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: expected a JSON object")
    for key in REQUIRED:
        if not rec.get(key):
            raise RecordError(f"{where}: missing {key!r}")
    if rec["tier"] not in TIERS:
        raise RecordError(f"{where}: tier {rec['tier']!r} is not one of {', '.join(TIERS)}")
    if not re.fullmatch(r"\d{4}-\d\d-\d\d", str(rec["date"])):
        raise RecordError(f"{where}: date {rec['date']!r} is not YYYY-MM-DD")
    if not (rec.get("machine") or rec.get("cpu_name")):
        raise RecordError(f"{where}: missing 'machine' (or the record's cpu_name)")
    if "rows" in rec:
        if not all(isinstance(r, dict) and "test" in r and "tokens_per_s" in r for r in rec["rows"]):
            raise RecordError(f"{where}: every entry of rows needs test and tokens_per_s")
    elif not all(k in rec for k in ("batch", "decode_s_per_pass", "decode_tokens_per_s")):
        raise RecordError(f"{where}: neither a llama-bench-shaped record (rows) nor a --batch record")


def _num(v):
    return "" if v is None else f"{v:g}"


def _load(rec):
    load = rec.get("load")
    if load is None and "loadavg_before" in rec and "loadavg_after" in rec:
        load = [rec["loadavg_before"][0], rec["loadavg_after"][0]]
    if not load:
        return ""
    lo, hi = min(load), max(load)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def _model(rec):
    return rec.get("model") or os.path.basename(os.path.normpath(rec.get("checkpoint", "")))


def table_rows(rec):
    """The table lines of one record."""
    head = [rec["date"], f"`{rec['commit']}`", rec.get("machine") or rec.get("cpu_name"), _load(rec), _model(rec),
            rec.get("gptq_mode", "exact")]
    theirs = rec.get("llama_cpp") or {}
    lines = []
    if "rows" in rec:
        for r in rec["rows"]:
            ours, lc = r["tokens_per_s"], theirs.get(r["test"])
            ratio = f"{ours / lc:.2f}" if lc else ""
            lines.append(head + [r["test"], _num(ours), _num(lc), ratio, rec.get("note", "")])
    else:
        bound = rec.get("ratio_to_bound")
        what = f"{rec['decode_s_per_pass']:g} s/pass" + (f", {bound:g}x the I/O bound" if bound else "")
        note = "; ".join(x for x in (what, rec.get("note", "")) if x)
        lines.append(head + [f"decode, batch {rec['batch']}", _num(rec["decode_tokens_per_s"]), "", "", note])
    return ["| " + " | ".join(str(c) for c in cells) + " |" for cells in lines]


def render_table(records):
    if not records:
        return "No runs recorded for this tier yet."
    return "\n".join(HEADER + [line for rec in records for line in table_rows(rec)])


def rewrite(text, by_tier):
    """text with every marked table replaced; a tier with records but no markers is an error."""
    for tier in TIERS:
        pattern = re.compile(rf"(<!-- perf-table: {tier} -->\n)(.*?)(<!-- /perf-table -->)", re.S)
        if not pattern.search(text):
            if by_tier[tier]:
                raise RecordError(f"docs/performance.md has no <!-- perf-table: {tier} --> markers")
            continue
        table = render_table(by_tier[tier])
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(3), text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the tables differ from the records")
    a = ap.parse_args(argv)
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    new = rewrite(text, read_records())
    if a.check:
        if new != text:
            print("docs/performance.md: tables differ from docs/perf/*.jsonl; run python tools/perf_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
