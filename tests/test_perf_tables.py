"""docs/performance.md's figure tables are what tools/perf_tables.py makes from docs/perf/*.jsonl."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("perf_tables", ROOT / "tools" / "perf_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


perf_tables = load_tool()


def test_the_tables_are_the_records():
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    assert perf_tables.rewrite(text, perf_tables.read_records()) == text, \
        "docs/performance.md differs from docs/perf/*.jsonl: run python tools/perf_tables.py"


def test_tiers_are_the_kernels_tiers():
    from tinyllama_ref.kernels import cpu
    assert perf_tables.TIERS == cpu.TIERS


def test_a_bench_generate_record_becomes_rows():
    # the fields `bench generate --json` prints that the table reads, plus the ones a run adds
    rec = {"checkpoint": "/tmp/perf7b", "gptq_mode": "int8", "cpu_name": "Some CPU", "cpu_tier": "avx2",
           "loadavg_before": [1.5, 1, 1], "loadavg_after": [2.0, 1, 1],
           "rows": [{"test": "pp64", "tokens": 64, "tokens_per_s": 20.0}, {"test": "tg16", "tokens_per_s": 5.0}],
           "tier": "avx2", "date": "2026-12-07", "commit": "abc1234", "llama_cpp": {"pp64": 25.0}}
    perf_tables.check_record(json.loads(json.dumps(rec)), "x")
    lines = perf_tables.table_rows(rec)
    assert lines[0] == "| 2026-12-07 | `abc1234` | Some CPU | 1.5-2 | perf7b | int8 | pp64 | 20 | 25 | 0.80 |  |"
    assert lines[1].endswith("| tg16 | 5 |  |  |  |")
    batch = {"tier": "amx", "date": "2026-12-07", "commit": "abc1234", "machine": "M", "batch": 8,
             "decode_s_per_pass": 4.4, "decode_tokens_per_s": 1.818, "ratio_to_bound": 0.97}
    perf_tables.check_record(batch, "x")
    assert "4.4 s/pass, 0.97x the I/O bound" in perf_tables.table_rows(batch)[0]


@pytest.mark.parametrize("change, message", [
    ({"tier": "sse2"}, "is not one of"), ({"date": "7 Dec"}, "YYYY-MM-DD"), ({"commit": ""}, "missing 'commit'"),
    ({"rows": [{"test": "pp64"}]}, "tokens_per_s")])
def test_a_bad_record_is_refused(change, message):
    rec = {"tier": "vnni", "date": "2026-12-07", "commit": "abc1234", "machine": "M",
           "rows": [{"test": "pp64", "tokens_per_s": 1.0}], **change}
    with pytest.raises(perf_tables.RecordError, match=message):
        perf_tables.check_record(rec, "x")


def test_rewriting_is_stable():
    text = "a\n<!-- perf-table: amx -->\nold\n<!-- /perf-table -->\nb\n<!-- perf-table: vnni -->\n<!-- /perf-table -->\n"
    by_tier = {t: [] for t in perf_tables.TIERS}
    once = perf_tables.rewrite(text, by_tier)
    assert once.count("No runs recorded") == 2 and "old" not in once and once.endswith("-->\n")
    assert perf_tables.rewrite(once, by_tier) == once
