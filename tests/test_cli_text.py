"""Every text command on a small synthetic checkpoint, through click's runner and as a subprocess."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import tinyllama_ref
from tinyllama_ref.cli import main

TEXT = ("The patient presented with fever and cough. Treatment with antibiotics was started, "
        "and the fever resolved within three days. ") * 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tinyllama_ref.make.synth import synthesize
    out = str(tmp_path_factory.mktemp("synth") / "tiny")
    synthesize(out, preset="tiny", bits=4, group_size=32, act_order=True, quiet=True)
    return out


def invoke(*args, input=None):
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    return r


def sub(*args, input=None):
    return subprocess.run([sys.executable, "-m", "tinyllama_ref", *map(str, args)], capture_output=True,
                          text=True, timeout=600, input=input)


def test_generate_text_json_record(ckpt):
    r = invoke("generate", ckpt, "--prompt", "The patient", "-n", "6", "--backend", "numpy", "--json",
               "--ignore-eos", "--greedy")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rec["token_ids"]) == 6 and rec["finish_reason"] == "length"
    assert set(rec["timings"]) >= {"load_s", "prefill_s", "per_token_s"}
    model = tinyllama_ref.load(ckpt, backend="numpy")
    assert rec["prompt_ids"] == model.tokenizer.encode("The patient", add_bos=True)
    assert rec["token_ids"] == model.generate(rec["prompt_ids"], max_new_tokens=6, stop_ids=[])
    tok = model.tokenizer
    whole = tok.decode(rec["prompt_ids"] + rec["token_ids"], skip_special_tokens=True)
    assert whole == tok.decode(rec["prompt_ids"], skip_special_tokens=True) + rec["completion"]


def test_generate_streams_the_same_text_as_json(ckpt):
    args = ["generate", ckpt, "--prompt", "Fever", "-n", "8", "--backend", "numpy", "--ignore-eos",
            "--temperature", "0.9", "--seed", "7", "-q"]
    streamed = sub(*args)
    assert streamed.returncode == 0, streamed.stderr
    rec = json.loads(sub(*args, "--json").stdout)
    assert streamed.stdout.rstrip("\n") == rec["completion"]


def test_same_seed_same_text_and_stdin_prompt(ckpt):
    args = ["generate", ckpt, "-n", "8", "--backend", "numpy", "--temperature", "1.0", "--seed", "3", "--json"]
    a = json.loads(invoke(*args, input="Cough and").stdout)
    b = json.loads(invoke(*args, input="Cough and").stdout)
    assert a["token_ids"] == b["token_ids"]


def test_prompts_file_batch_writes_jsonl(ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The fever"}\n{"prompt": "Antibiotics were"}\n{"prompt_ids": [1, 5, 9]}\n')
    out = tmp_path / "out.jsonl"
    r = invoke("generate", ckpt, "--prompts-file", prompts, "-o", out, "-n", "5", "--backend", "numpy",
               "--ignore-eos", "--greedy")
    assert r.exit_code == 0, r.output
    header, *recs = [json.loads(line) for line in out.read_text().splitlines()]   # -o: a header line first
    assert header["command"] == "generate" and len(recs) == 3
    model = tinyllama_ref.load(ckpt, backend="numpy")
    for rec in recs:                     # the batch gives what each prompt gives alone
        assert rec["token_ids"] == model.generate(rec["prompt_ids"], max_new_tokens=5, stop_ids=[])


def test_stop_string_ends_generation_and_is_not_printed(ckpt):
    model = tinyllama_ref.load(ckpt, backend="numpy")
    free = model.generate_text("The patient", max_new_tokens=12, temperature=0.0)
    if len(free.text) < 4:
        pytest.skip("the random model stopped too early to cut its text")
    stop = free.text[2:4]
    cut = model.generate_text("The patient", max_new_tokens=12, temperature=0.0, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.find(stop)]


_windows = {}


def window_logits(model, ids, b):
    if b not in _windows:
        _windows[b] = model.logits(ids[b:b + 64])
    return _windows[b]


def test_perplexity_matches_direct_computation(ckpt, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    r = invoke("perplexity", ckpt, f, "--context", "64", "--stride", "32", "--backend", "numpy", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout.strip().splitlines()[-1])
    model = tinyllama_ref.load(ckpt, backend="numpy")
    ids = model.tokenizer.encode(TEXT, add_bos=True)
    # Each token t >= 1 is scored once, by the first window [b, b + 64) (b a multiple of 32) that holds it.
    nll, n = 0.0, 0
    for t in range(1, len(ids)):
        b = 0 if t < 64 else ((t - 64) // 32 + 1) * 32
        logits = window_logits(model, ids, b).astype(np.float64)
        row = logits[t - 1 - b]
        nll += math.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[t]]
        n += 1
    assert got["n_scored"] == n
    assert math.isfinite(got["perplexity"])
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_score_items(ckpt, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(x) for x in [
        {"question": "What treats a bacterial fever?", "options": ["antibiotics", "rest", "surgery"], "answer": 0},
        {"question": "Cough is a symptom of?", "options": ["flu", "a broken arm"], "answer": "flu"},
        {"question": "Pick one", "options": {"A": "yes", "B": "no"}, "answer": "B"},
    ]) + "\n")
    r = invoke("score", ckpt, items, "--backend", "numpy", "--json")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    per_item, summary = lines[:-1], lines[-1]
    assert [x["answer"] for x in per_item] == [0, 0, 1]
    model = tinyllama_ref.load(ckpt, backend="numpy")
    tok = model.tokenizer
    # Option 1 of item 1 scored directly: sum of log p over its tokens after the prompt.
    prompt = "Question: What treats a bacterial fever?\nAnswer:"
    ctx = tok.encode(prompt, add_bos=True)
    whole = tok.encode(prompt + " rest", add_bos=True)
    logits = model.logits(whole).astype(np.float64)
    lp = sum(logits[t - 1, whole[t]] - np.log(np.exp(logits[t - 1]).sum()) for t in range(len(ctx), len(whole)))
    assert per_item[0]["loglik"][1] == pytest.approx(lp, rel=1e-5)
    acc = sum(x["choice"] == x["answer"] for x in per_item) / 3
    assert summary["accuracy"] == pytest.approx(acc)


def test_chat_turns_reset_quit(ckpt):
    p = sub("chat", ckpt, "--backend", "numpy", "-n", "4", "--greedy",
            input="Hello there\n/reset\nHow is the fever?\n/quit\nnever read\n")
    assert p.returncode == 0, p.stderr
    assert "history cleared" in p.stderr
    assert len(p.stdout.splitlines()) == 2           # one reply line per user turn


def test_int8_mode_is_opt_in_and_close(ckpt):
    from tinyllama_ref.kernels import cpu, table
    if not table.int8_available(cpu.process_tier()):
        pytest.skip(f"int8 mode has no kernels at this process's CPU tier ({cpu.describe()})")
    args = ["generate", ckpt, "--prompt", "The patient", "-n", "4", "--json", "--ignore-eos", "--greedy"]
    exact = json.loads(invoke(*args).stdout)
    approx = invoke(*args, "--gptq-mode", "int8")
    assert approx.exit_code == 0, approx.output
    assert len(json.loads(approx.stdout)["token_ids"]) == 4
    assert exact["token_ids"] == json.loads(invoke(*args).stdout)["token_ids"]


def test_inspect_json(ckpt):
    r = invoke("inspect", ckpt, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert "GPTQ 4-bit, group size 32, act-order yes" in info["quantization"]
    assert info["vocabulary"].startswith("1000 ")


# -- bad input: one line, non-zero exit, no traceback ---------------------------------------------------------
@pytest.fixture(scope="module")
def no_tokenizer(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("notok") / "ckpt"
    shutil.copytree(ckpt, d)
    os.remove(d / "tokenizer.model")
    return str(d)


def one_line_error(p, text):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    assert text in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_missing_checkpoint_dir(tmp_path):
    one_line_error(sub("generate", tmp_path / "nope", "--prompt", "hi"), "no such checkpoint directory")


def test_no_tokenizer_is_clear_but_ids_still_work(no_tokenizer):
    one_line_error(sub("generate", no_tokenizer, "--prompt", "hi", "-q"), "tokenizer.model")
    p = sub("generate", no_tokenizer, "--prompt-ids", "1,5,9", "-n", "3", "--backend", "numpy", "-q",
            "--ignore-eos")
    assert p.returncode == 0 and len(p.stdout.strip().split(",")) == 3


def test_empty_prompt(ckpt):
    one_line_error(sub("generate", ckpt, "--prompt", "   ", "-q"), "empty prompt")


def test_prompt_longer_than_context(ckpt, tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("fever " * 2000)
    one_line_error(sub("generate", ckpt, "--prompt-file", f, "-q", "--backend", "numpy"), "context is 512")


def test_malformed_jsonl_names_the_line(ckpt, tmp_path):
    items = tmp_path / "bad.jsonl"
    items.write_text('{"question": "q", "options": ["a", "b"], "answer": 0}\n{"question": oops}\n')
    one_line_error(sub("score", ckpt, items, "-q"), "bad.jsonl:2")


def test_unknown_template(ckpt):
    p = sub("generate", ckpt, "--prompt", "hi", "--template", "alpaca")
    assert p.returncode == 2 and "alpaca" in p.stderr and "Traceback" not in p.stderr


def test_nonsense_sampling_values(ckpt):
    one_line_error(sub("generate", ckpt, "--prompt", "hi", "--top-p", "1.5", "-q"), "top_p")


def test_token_past_the_embedding_is_named(ckpt):
    # The synthetic tokenizer lists <|im_end|> one past the embedding, as Meditron's files do.
    model = tinyllama_ref.load(ckpt, backend="numpy")
    im_end = model.tokenizer.token_id("<|im_end|>")
    if im_end is None or im_end < model.cfg.vocab_size:
        pytest.skip("this synthetic tokenizer has <|im_end|> inside the embedding")
    one_line_error(sub("generate", ckpt, "--prompt", "hi", "--template", "chatml", "-q"), "<|im_")
