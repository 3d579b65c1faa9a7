"""Prefix reuse through the real server: prompts that start like earlier ones (few-shot items, a chat's next
turn) take those positions' keys and values from the KV pool. Greedy text is the same with and without it,
and /metrics shows what was computed; the expected counts come from the tokenizer, not from the server."""

import re
import threading

import httpx
import pytest

import tinyllama_ref

from test_serve import make_checkpoint, start_server, stop_server

SHOTS = ("Question: Which organ pumps blood?\nA. liver\nB. heart\nC. lung\nAnswer: B\n\n"
         "Question: Which vitamin does sunlight help the skin make?\nA. vitamin D\nB. vitamin C\nC. vitamin K\n"
         "Answer: A\n\n"
         "Question: What does an antipyretic lower?\nA. blood sugar\nB. heart rate\nC. fever\nAnswer: C\n\n")
ORGANS = ("kidney", "lung", "liver", "spleen", "stomach", "pancreas", "thyroid", "skin", "brain", "bone")
ITEMS = [f"Question: Case {i}: which organ is the {ORGANS[i % 10]} next to?\nA. {ORGANS[(i + 1) % 10]}\n"
         f"B. {ORGANS[(i + 3) % 10]}\nC. {ORGANS[(i + 7) % 10]}\nAnswer:" for i in range(40)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("prefix") / "tiny-gptq"))


@pytest.fixture(scope="module")
def model(ckpt):
    return tinyllama_ref.load(ckpt, backend="numpy")


def counters(url):
    """The unlabelled numbers of GET /metrics."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(tinyllama_\w+) (\S+)$", httpx.get(url + "/metrics").text, re.M)}


def generate(url, text, n):
    r = httpx.post(url + "/generate", timeout=300,
                   json={"inputs": text, "parameters": {"max_new_tokens": n, "details": True}})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_forty_three_shot_items_cost_one_prefix_plus_their_own_tokens(ckpt, model):
    """40 items sent at once (8 run at a time): the few-shot prefix is computed about once."""
    tok = model.tokenizer
    prefix = len(tok.encode(SHOTS, add_bos=True))
    prompts = [tok.encode(SHOTS + item, add_bos=True) for item in ITEMS]
    assert all(p[:prefix - 1] == prompts[0][:prefix - 1] for p in prompts)   # the text's last token may merge
    own = sum(len(p) - prefix for p in prompts)
    bound = 1.2 * (prefix + own)
    assert bound < 0.4 * sum(len(p) for p in prompts)          # computing every prompt in full would fail it
    proc, url = start_server(ckpt, "--max-batch", 8, "--prefill-chunk", 64, backend="numpy")
    try:
        answers = [None] * len(ITEMS)

        def ask(i):
            answers[i] = generate(url, SHOTS + ITEMS[i], 1)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(ITEMS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        m = counters(url)
    finally:
        code, err = stop_server(proc)
    assert code == 0, err
    assert m["tinyllama_prompt_tokens_total"] == sum(len(p) for p in prompts)
    computed, reused = m["tinyllama_prefill_tokens_total"], m["tinyllama_prefix_reused_tokens_total"]
    assert computed + reused == sum(len(p) for p in prompts)
    assert computed <= bound, (computed, prefix, own)
    for i in range(0, len(ITEMS), 5):                          # and the answers are the model's own (a sample:
        assert answers[i] == model.generate(prompts[i], max_new_tokens=1)   # the numpy reference is slow)


def test_greedy_text_is_the_same_with_and_without_prefix_reuse(ckpt, model):
    """A chat's next turn starts with the previous prompt and answer; repeated and extended prompts too.
    Both servers give the tokens of the in-process generate() on the full prompt."""
    tok = model.tokenizer
    first = "The patient presented with fever and a cough that had lasted three days; the doctor said"
    turns = [first]
    results = {}
    for flags in ((), ("--no-prefix-cache",)):
        proc, url = start_server(ckpt, "--max-batch", 4, "--prefill-chunk", 16, *flags, backend="numpy")
        try:
            out = [generate(url, first, 8)]
            answer = tok.decode(out[0])
            turns = [first, first + answer + " Then the nurse asked", first, first + " and the lab"]
            out += [generate(url, t, 8) for t in turns[1:]]
            results[flags] = out, counters(url)
        finally:
            code, err = stop_server(proc)
        assert code == 0, err
    (with_reuse, m_on), (without, m_off) = results[()], results[("--no-prefix-cache",)]
    assert with_reuse == without
    for text, ids in zip(turns, with_reuse):
        assert ids == model.generate(tok.encode(text, add_bos=True), max_new_tokens=8)
    prompt_tokens = sum(len(tok.encode(t, add_bos=True)) for t in turns)
    assert m_off["tinyllama_prefix_reused_tokens_total"] == 0
    assert m_off["tinyllama_prefill_tokens_total"] == prompt_tokens
    # the repeated first prompt alone reuses all but its last token
    assert m_on["tinyllama_prefix_reused_tokens_total"] >= len(tok.encode(first, add_bos=True)) - 1
    assert m_on["tinyllama_prefill_tokens_total"] + m_on["tinyllama_prefix_reused_tokens_total"] == prompt_tokens


def test_multiple_choice_loglikelihood_requests_reuse_the_shots(ckpt, model):
    """The way lm-evaluation-harness scores multiple choice through /v1/completions: echo, max_tokens 0,
    logprobs 1, one request per option. 8 items x 3 options share the shots; each option shares its item's
    question. The prompt logprobs come back as the model's own (log-softmax of the full prompt's logits)."""
    import numpy as np
    from tinyllama_ref.ops import log_softmax
    tok = model.tokenizer
    requests = [SHOTS + item + f" {letter}" for item in ITEMS[:8] for letter in "ABC"]
    prompts = [tok.encode(r, add_bos=True) for r in requests]
    prefix = len(tok.encode(SHOTS, add_bos=True))
    questions = [len(tok.encode(SHOTS + item, add_bos=True)) for item in ITEMS[:8]]
    # the shots once, each question once, each option's last tokens, plus the one position a logprob request
    # computes again past what it takes from the pool
    expected = prefix + sum(q - prefix for q in questions) + sum(len(p) - q + 1 for p, q in
                                                                 zip(prompts, np.repeat(questions, 3)))
    proc, url = start_server(ckpt, "--max-batch", 8, "--prefill-chunk", 64, backend="numpy")
    try:
        out = [None] * len(requests)

        def ask(i):
            r = httpx.post(url + "/v1/completions", timeout=300, json={"prompt": requests[i], "max_tokens": 0,
                                                                       "echo": True, "logprobs": 1})
            assert r.status_code == 200, r.text
            out[i] = r.json()["choices"][0]["logprobs"]
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        m = counters(url)
    finally:
        code, err = stop_server(proc)
    assert code == 0, err
    computed, reused = m["tinyllama_prefill_tokens_total"], m["tinyllama_prefix_reused_tokens_total"]
    assert computed + reused == sum(len(p) for p in prompts)
    assert computed <= 1.2 * expected, (computed, expected)
    for i in (0, 1, 5, 23):
        ids = prompts[i]
        ref = log_softmax(model.logits(ids).astype(np.float64), axis=-1)          # [T, V]
        lp = out[i]
        assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
        np.testing.assert_allclose(lp["token_logprobs"][1:], [ref[j - 1, ids[j]] for j in range(1, len(ids))],
                                   atol=1e-4)
        for j in range(1, len(ids)):
            assert max(lp["top_logprobs"][j].values()) == pytest.approx(ref[j - 1].max(), abs=1e-4)
