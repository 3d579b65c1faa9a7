"""Resumable runs: `score` (and `perplexity`, `generate --prompts-file`) killed with SIGKILL at several points,
then resumed, write exactly the file an uninterrupted run writes; a resume that does not fit is refused."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from eval_checkpoint import make_eval_checkpoint
from tinyllama_ref.cli import main
from tinyllama_ref.make.tokenizer_files import generate_text

# Runs the command line in this process after arranging for it to SIGKILL itself at the n-th time it
# reaches one point. The points are inside our code, so the kills land where they are meant to.
KILLER = r'''
import json, os, signal, sys
point, n = sys.argv[1], int(sys.argv[2])
calls = [0]
def due():
    calls[0] += 1
    return calls[0] == n
def die():
    os.kill(os.getpid(), signal.SIGKILL)
import tinyllama_ref.eval.results as results
from tinyllama_ref.model import Model
if point == "forward":                       # before the n-th pass over the weights (mid-batch for some n)
    forward = Model.forward
    def patched(self, *a, **k):
        if due(): die()
        return forward(self, *a, **k)
    Model.forward = patched
elif point == "fsync":                       # a batch written and flushed, not yet fsync'ed
    fsync = os.fsync
    def patched(fd):
        if due(): die()
        return fsync(fd)
    os.fsync = patched
elif point in ("torn", "after"):             # half a batch's lines written / a whole batch on disk
    append = results.ResultsWriter.append
    def patched(self, records):
        if point == "torn" and due():
            data = "".join(json.dumps(r) + "\n" for r in records).encode()
            self._f.write(data[:len(data) // 2]); self._f.flush(); die()
        append(self, records)
        if point == "after" and due(): die()
    results.ResultsWriter.append = patched
from tinyllama_ref.cli import main
main(args=sys.argv[3:], prog_name="tinyllama-ref")
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_resume")
    ckpt = make_eval_checkpoint(str(root / "ckpt"))
    other = make_eval_checkpoint(str(root / "other"), seed=1)          # same shapes, other weights
    sents = generate_text(40, 200, seed=8)
    rng = random.Random(2)
    items = root / "items.jsonl"
    items.write_text("".join(json.dumps({"question": sents[i][:rng.randint(30, 70)],
                                         "options": [sents[10 + i + j][:rng.randint(4, 25)] for j in range(3)],
                                         "answer": rng.randrange(3)}) + "\n" for i in range(8)))
    killer = root / "killer.py"
    killer.write_text(KILLER)
    return {"root": root, "ckpt": ckpt, "other": other, "items": items, "killer": killer,
            "text": " ".join(sents[20:32])}


SCORE = ["--backend", "numpy", "--batch-tokens", "120", "-q"]


def run(*args, killer=None, point=None, n=0):
    head = [sys.executable, str(killer), point, str(n)] if killer else [sys.executable, "-m", "tinyllama_ref"]
    return subprocess.run(head + [str(a) for a in args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(env):
    out = env["root"] / "reference.jsonl"
    p = run("score", env["ckpt"], env["items"], "-o", out, *SCORE)
    assert p.returncode == 0, p.stderr
    return out.read_text()


def test_reference_run_is_in_order_results_only_and_repeatable(env, reference):
    header, *records = [json.loads(line) for line in reference.splitlines()]
    assert header["command"] == "score" and header["settings"]["batch_tokens"] == 120
    assert [r["item"] for r in records] == list(range(1, 9))
    assert not any("second" in key or "time" in key for r in records for key in r)
    again = env["root"] / "again.jsonl"
    assert run("score", env["ckpt"], env["items"], "-o", again, *SCORE).returncode == 0
    assert again.read_text() == reference                       # two runs of the same input: the same lines


@pytest.mark.parametrize("point,n", [("forward", 4), ("forward", 5), ("fsync", 3), ("torn", 2), ("after", 1)])
def test_killed_then_resumed_equals_uninterrupted(env, reference, point, n):
    out = env["root"] / f"killed-{point}-{n}.jsonl"
    p = run("score", env["ckpt"], env["items"], "-o", out, *SCORE, killer=env["killer"], point=point, n=n)
    assert p.returncode == -signal.SIGKILL, p.stderr
    partial = out.read_text()
    assert 1 <= partial.count("\n") < reference.count("\n")      # it died part-way
    if point == "torn":
        assert not partial.endswith("\n")                        # a torn last line
    p = run("score", env["ckpt"], env["items"], "-o", out, "--resume", *SCORE)
    assert p.returncode == 0, p.stderr
    assert out.read_text() == reference


def test_resume_keeps_the_partial_runs_batch_size(env, reference):
    """Without --batch-tokens, a resumed run takes the partial file's, so it rebuilds the same batches."""
    out = env["root"] / "killed-default.jsonl"
    run("score", env["ckpt"], env["items"], "-o", out, *SCORE, killer=env["killer"], point="after", n=2)
    p = run("score", env["ckpt"], env["items"], "-o", out, "--resume", "--backend", "numpy", "-q")
    assert p.returncode == 0, p.stderr
    assert out.read_text() == reference


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("change,message", [
    ("checkpoint", "another checkpoint"),
    ("batch", "batch_tokens=120"),
    ("fewshot", "num_fewshot"),
    ("input", "other contents"),
])
def test_mismatched_resume_is_refused(env, reference, tmp_path, change, message):
    out = tmp_path / "partial.jsonl"
    out.write_text("".join(reference.splitlines(keepends=True)[:3]))        # header and two records
    items, ckpt, extra = env["items"], env["ckpt"], list(SCORE)
    if change == "checkpoint":
        ckpt = env["other"]
    elif change == "batch":
        extra[extra.index("120")] = "64"
    elif change == "fewshot":
        extra += ["--num-fewshot", "1", "--fewshot-file", env["items"]]
    else:                                        # another file: a question edited
        items = tmp_path / "items.jsonl"
        items.write_text(env["items"].read_text().replace("\"question\": \"", "\"question\": \"Edited ", 1))
    r = invoke("score", ckpt, items, "-o", out, "--resume", *extra)
    assert r.exit_code == 1, r.output
    assert "cannot resume" in r.output and message in r.output
    assert out.read_text() == "".join(reference.splitlines(keepends=True)[:3])   # left as it was


def test_existing_output_without_resume_is_refused_before_loading(env, reference, tmp_path):
    out = tmp_path / "done.jsonl"
    out.write_text(reference)
    r = invoke("score", "/no/such/checkpoint", env["items"], "-o", out)
    assert r.exit_code == 1 and "--resume" in r.output              # before the (missing) model is opened
    r = invoke("score", env["ckpt"], env["items"], "-o", tmp_path / "no-dir" / "x.jsonl")
    assert r.exit_code == 1 and "does not exist" in r.output


def test_perplexity_killed_and_resumed(env):
    text = env["root"] / "text.txt"
    text.write_text(env["text"])
    args = ["--context", "32", "--stride", "16", "--backend", "numpy", "--batch-tokens", "64", "-q", "--json"]
    ref, out = env["root"] / "ppl-ref.jsonl", env["root"] / "ppl.jsonl"
    whole = run("perplexity", env["ckpt"], text, "-o", ref, *args)
    assert whole.returncode == 0, whole.stderr
    p = run("perplexity", env["ckpt"], text, "-o", out, *args, killer=env["killer"], point="forward", n=2)
    assert p.returncode == -signal.SIGKILL
    p = run("perplexity", env["ckpt"], text, "-o", out, "--resume", *args)
    assert p.returncode == 0, p.stderr
    assert out.read_text() == ref.read_text()
    records = [json.loads(line) for line in ref.read_text().splitlines()[1:]]
    assert len(records) > 3
    # The perplexity printed is the one the window records add up to, and the reference's (eval/loglik.py).
    import math

    import tinyllama_ref
    from tinyllama_ref.eval.loglik import perplexity
    nll = sum(r["nll"] for r in records)
    n = sum(r["n_scored"] for r in records)
    got = json.loads(p.stdout)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-12)
    model = tinyllama_ref.load(env["ckpt"], backend="numpy")
    want = perplexity(model, model.tokenizer.encode(env["text"], add_bos=True), 32, 16)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5) and got["n_scored"] == want["n_scored"]


def test_generate_prompts_file_killed_and_resumed(env):
    prompts = env["root"] / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": s[:30]}) + "\n" for s in generate_text(6, 100, seed=4)))
    args = ["--prompts-file", prompts, "-n", "6", "--backend", "numpy", "--batch-tokens", "30", "-q",
            "--temperature", "0.8", "--seed", "5", "--ignore-eos"]
    ref, out = env["root"] / "gen-ref.jsonl", env["root"] / "gen.jsonl"
    assert run("generate", env["ckpt"], *args, "-o", ref).returncode == 0
    p = run("generate", env["ckpt"], *args, "-o", out, killer=env["killer"], point="after", n=2)
    assert p.returncode == -signal.SIGKILL
    p = run("generate", env["ckpt"], *args, "-o", out, "--resume")
    assert p.returncode == 0, p.stderr

    def results(path):                           # generation records carry timings: compare the rest
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return [lines[0]] + [{k: v for k, v in r.items() if k != "timings"} for r in lines[1:]]
    assert results(out) == results(ref) and len(results(ref)) == 7
