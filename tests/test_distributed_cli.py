"""The commands with --ray / --pipeline write what a single process writes.

The distributed runs go through click's runner in this process, on the session's local Ray cluster (2 CPUs:
two workers, or two stages, of one CPU each). The reference is the same command as a separate process with
one BLAS thread (OMP_NUM_THREADS=1), as Ray gives each one-CPU actor: the -o files must be equal line for line.
"""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from distributed_helpers import ray_cluster  # noqa: F401 (a fixture)
from tinyllama_ref.cli import main

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tinyllama_ref.make.synth import synthesize
    from tinyllama_ref.make.tokenizer_files import generate_text
    d = tmp_path_factory.mktemp("dist_cli")
    ckpt = str(d / "ckpt")
    synthesize(ckpt, preset="tiny", bits=4, group_size=32, act_order=True, quiet=True)
    lines = generate_text(80, 80, seed=5)
    with open(d / "items.jsonl", "w") as f:
        for i in range(16):
            options = [" ".join(lines[20 + 2 * i + k].split()[:2 + (i + k) % 5]) or "none" for k in range(3)]
            f.write(json.dumps({"question": " ".join(lines[i].split()[:4 + i % 7]), "options": options,
                                "answer": i % 3}) + "\n")
    (d / "text.txt").write_text(" ".join(generate_text(30, 60, seed=9)))
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"prompt": " ".join(lines[40 + i].split()[:3 + i % 4])}) + "\n")
    return d, ckpt


def single(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "tinyllama_ref", *map(str, args)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    return r


def on_ray(*args):
    r = CliRunner().invoke(main, [str(a) for a in args] + ["--ray", "auto", "--workers", "2"])
    assert r.exit_code == 0, r.output
    return r


def lines_of(path):
    return open(path, encoding="utf-8").read().splitlines()


def test_score_file_equals_one_process_and_resumes(ray_cluster, files):
    d, ckpt = files
    args = ["score", ckpt, d / "items.jsonl", "--batch-tokens", 96, "--backend", "numpy", "-q"]
    single(*args, "-o", d / "score-1.jsonl")
    on_ray(*args, "-o", d / "score-ray.jsonl")
    expected = lines_of(d / "score-1.jsonl")
    assert len(expected) == 17 and lines_of(d / "score-ray.jsonl") == expected      # header + 16 records
    # A run killed half way: the header, 7 whole records and a torn eighth; --resume finishes it on Ray.
    with open(d / "score-cut.jsonl", "w") as f:
        f.write("\n".join(expected[:8]) + "\n" + expected[8][:20])
    on_ray(*args, "-o", d / "score-cut.jsonl", "--resume")
    assert lines_of(d / "score-cut.jsonl") == expected


def test_perplexity_file_equals_one_process(ray_cluster, files):
    d, ckpt = files
    args = ["perplexity", ckpt, d / "text.txt", "--context", 64, "--stride", 40, "--batch-tokens", 96,
            "--backend", "numpy", "-q", "--json"]
    a = single(*args, "-o", d / "ppl-1.jsonl")
    b = on_ray(*args, "-o", d / "ppl-ray.jsonl")
    assert lines_of(d / "ppl-ray.jsonl") == lines_of(d / "ppl-1.jsonl")
    assert json.loads(b.stdout)["perplexity"] == json.loads(a.stdout)["perplexity"]


def test_generate_prompts_file_equals_one_process(ray_cluster, files):
    d, ckpt = files
    args = ["generate", ckpt, "--prompts-file", d / "prompts.jsonl", "-n", 6, "--greedy", "--batch-tokens", 40,
            "--backend", "numpy", "-q"]
    single(*args, "-o", d / "gen-1.jsonl")
    on_ray(*args, "-o", d / "gen-ray.jsonl")
    untimed = [{k: v for k, v in json.loads(line).items() if k != "timings"}
               for line in lines_of(d / "gen-1.jsonl")]
    got = [{k: v for k, v in json.loads(line).items() if k != "timings"} for line in lines_of(d / "gen-ray.jsonl")]
    assert got == untimed and [r["item"] for r in got[1:]] == list(range(1, 11))


def test_generate_on_a_pipeline_gives_the_same_text(ray_cluster, files):
    _, ckpt = files
    args = ["generate", ckpt, "--prompt", "The patient presented with", "-n", 8, "--greedy", "--json", "-q"]
    expected = json.loads(single(*args).stdout)
    r = CliRunner().invoke(main, [str(a) for a in args] + ["--pipeline", "auto", "--stages", "2"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["token_ids"] == expected["token_ids"] and got["completion"] == expected["completion"]


def test_workers_without_ray_is_one_line(files):
    d, ckpt = files
    r = subprocess.run([sys.executable, "-m", "tinyllama_ref", "score", ckpt, d / "items.jsonl", "--workers", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--workers goes with --ray" in r.stderr and "Traceback" not in r.stderr
