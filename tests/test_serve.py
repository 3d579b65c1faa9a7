"""The HTTP server, run for real (`python -m tinyllama_ref serve`) and spoken to with the real clients:
huggingface_hub.InferenceClient, openai.OpenAI, lm-evaluation-harness's local-completions model and plain
httpx. Every answer is checked against the same checkpoint run in-process."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import pytest

import tinyllama_ref
from tinyllama_ref.eval.items import Item
from tinyllama_ref.eval.loglik import score_item
from tinyllama_ref.ops import log_softmax

MAX_BATCH = 8
PREFILL_CHUNK = 16          # small, so the test prompts are fed over several passes
NEW = 8                     # new tokens per test request
PROMPTS = ["The patient presented with fever", "Cough and", "Antibiotics were", "The fever resolved",
           "Treatment with", "Three days", "Hello", "Aspirin is"]


# -- a server in a subprocess ---------------------------------------------------------------------------------
def die_with_parent():
    """Linux: the server gets SIGTERM if the test process dies, so no server outlives its test run."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_server(ckpt, *args, backend="numba", timeout=180):
    """Start `tinyllama-ref serve --port 0` (a free port) and wait for /health; (process, base url).
    Its stderr goes to a file (a pipe nobody reads could fill up and stall it): stop_server returns it."""
    fd, path = tempfile.mkstemp(prefix="serve-", suffix=".log")
    with os.fdopen(fd, "a") as log:                   # append mode: our reads never move its writes
        proc = subprocess.Popen([sys.executable, "-m", "tinyllama_ref", "serve", ckpt, "--port", "0",
                                 "--backend", backend, *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=log, preexec_fn=die_with_parent)
    proc.log_path = path
    url = None
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {read_log(proc)}")
        found = re.search(r"(http://127\.0\.0\.1:\d+)/health", read_log(proc))   # --port 0: the port it got
        url = url or (found and found.group(1))
        try:
            if url and httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy in time")


def read_log(proc):
    if not os.path.exists(proc.log_path):           # stop_server already read and removed it
        return ""
    with open(proc.log_path, encoding="utf-8") as f:
        return f.read()


def stop_server(proc, timeout=60):
    """SIGTERM, then wait; returns (exit code, stderr). Safe to call again on a stopped server."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the server did not stop within {timeout} s after SIGTERM: {read_log(proc)}")
    log = read_log(proc)
    if os.path.exists(proc.log_path):
        os.remove(proc.log_path)
    return proc.returncode, log


def make_checkpoint(path):
    from tinyllama_ref.make.synth import synthesize
    synthesize(path, preset="tiny", bits=4, group_size=32, act_order=True, quiet=True)
    return path


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("serve") / "tiny-gptq"))


@pytest.fixture(scope="session")
def model(ckpt):
    return tinyllama_ref.load(ckpt)            # the numba kernels, as the server runs them


@pytest.fixture(scope="session")
def server(ckpt):
    proc, url = start_server(ckpt, "--max-batch", MAX_BATCH, "--prefill-chunk", PREFILL_CHUNK,
                             "--template", "llama2", "--model-name", "tiny")
    try:
        yield url
    finally:
        code, err = stop_server(proc)
    assert code == 0, err


@pytest.fixture(scope="session")
def greedy_texts(model):
    """The in-process reference: what each prompt's greedy continuation is."""
    return {p: model.generate_text(p, max_new_tokens=NEW, temperature=0.0).text for p in PROMPTS}


@pytest.fixture
def tgi(server, monkeypatch):
    """InferenceClient on the local server. huggingface_hub refuses every request while HF_HUB_OFFLINE is set
    (conftest sets it so nothing reaches the Hub); this client only ever talks to 127.0.0.1."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return InferenceClient(base_url=server)


def oai(server):
    import openai
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


# -- TGI through huggingface_hub.InferenceClient ---------------------------------------------------------------
def test_text_generation_greedy_equals_generate_text(server, tgi, greedy_texts):
    client = tgi
    prompt = PROMPTS[0]
    assert client.text_generation(prompt, max_new_tokens=NEW) == greedy_texts[prompt]
    streamed = list(client.text_generation(prompt, max_new_tokens=NEW, stream=True))
    assert "".join(streamed) == greedy_texts[prompt]


def test_text_generation_details(server, tgi, model):
    client = tgi
    prompt = PROMPTS[1]
    out = client.text_generation(prompt, max_new_tokens=NEW, details=True, decoder_input_details=True)
    ids = model.tokenizer.encode(prompt, add_bos=True)
    new = model.generate(ids, max_new_tokens=NEW)
    assert [t.id for t in out.details.tokens] == new[:len(out.details.tokens)]
    assert out.details.generated_tokens == len(out.details.tokens)
    assert out.details.finish_reason == ("eos_token" if new[-1] in model.tokenizer.eos_ids else "length")
    assert [t.id for t in out.details.prefill] == ids
    ref = log_softmax(model.logits(ids + new).astype(np.float64), axis=-1)       # [T, V]
    assert out.details.prefill[0].logprob is None
    np.testing.assert_allclose([t.logprob for t in out.details.prefill[1:]],
                               [ref[i - 1, ids[i]] for i in range(1, len(ids))], atol=1e-4)
    np.testing.assert_allclose([t.logprob for t in out.details.tokens],
                               [ref[len(ids) + k - 1, t] for k, t in enumerate(new)], atol=1e-4)
    assert "".join(t.text for t in out.details.tokens) == out.generated_text


def test_stream_details_and_return_full_text(server, tgi, greedy_texts):
    client = tgi
    prompt = PROMPTS[2]
    events = list(client.text_generation(prompt, max_new_tokens=NEW, stream=True, details=True))
    assert [e.index for e in events] == list(range(len(events)))
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].generated_text == greedy_texts[prompt]
    assert events[-1].details.generated_tokens == len(events)
    full = client.text_generation(prompt, max_new_tokens=NEW, return_full_text=True)
    assert full == prompt + greedy_texts[prompt]


def test_seeded_sampling_reproduces_and_reports_seed(server, tgi):
    client = tgi
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=0.7, top_p=0.95, top_k=40,
              repetition_penalty=1.1, details=True)
    a = client.text_generation("Fever", seed=11, **kw)
    b = client.text_generation("Fever", seed=11, **kw)
    assert a.generated_text == b.generated_text and a.details.seed == 11
    unseeded = client.text_generation("Fever", **kw)
    assert isinstance(unseeded.details.seed, int)                   # the seed it drew, to reproduce it
    again = client.text_generation("Fever", seed=unseeded.details.seed, **kw)
    assert again.generated_text == unseeded.generated_text


def test_stop_sequences_cut_the_text(server, tgi, greedy_texts):
    prompt = PROMPTS[5]
    free = greedy_texts[prompt]
    if len(free) < 6:
        pytest.skip("the random model's text is too short to cut")
    stop = free[3:5]
    cut = free[:free.find(stop)]
    out = tgi.text_generation(prompt, max_new_tokens=NEW, stop=[stop], details=True)
    assert out.generated_text == cut and out.details.finish_reason == "stop_sequence"
    streamed = list(tgi.text_generation(prompt, max_new_tokens=NEW, stop=[stop], stream=True))
    assert "".join(streamed) == cut
    choice = oai(server).completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0,
                                            stop=stop).choices[0]
    assert choice.text == cut and choice.finish_reason == "stop"


def test_endpoint_info_and_health(server, tgi):
    from huggingface_hub import InferenceClient
    client = InferenceClient(server, provider="hf-inference")   # huggingface_hub 1.x+ asks for the provider here
    info = client.get_endpoint_info()
    assert info["model_id"] == "tiny" and info["max_total_tokens"] == 512 and info["max_batch_size"] == MAX_BATCH
    assert info["model_dtype"] == "gptq-4bit"                      # make_checkpoint's bits=4
    assert client.health_check(server)


def test_chat_completion_through_inference_client(server, tgi, model):
    client = tgi
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is fever?"}]
    out = client.chat_completion(messages, max_tokens=NEW, temperature=0.0)
    ref = model.generate_text("What is fever?", system="Be brief.", template="llama2", max_new_tokens=NEW,
                              temperature=0.0)
    assert out.choices[0].message.content == ref.text
    chunks = list(client.chat_completion(messages, max_tokens=NEW, temperature=0.0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text


# -- OpenAI through the openai client --------------------------------------------------------------------------
def test_openai_completions_greedy_and_stream(server, greedy_texts):
    client = oai(server)
    prompt = PROMPTS[3]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0)
    assert out.choices[0].text == greedy_texts[prompt]
    assert out.usage.completion_tokens <= NEW
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == greedy_texts[prompt]
    many = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=NEW, temperature=0)
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == [greedy_texts[p] for p in PROMPTS[:2]]


def test_openai_echo_logprobs_equal_log_softmax(server, model):
    client = oai(server)
    prompt = "The patient presented with fever and cough; antibiotics were started and the fever resolved."
    ids = model.tokenizer.encode(prompt, add_bos=True)
    assert len(ids) > 2 * PREFILL_CHUNK                     # the prompt is prefilled in several chunks
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=2,
                                    echo=True)
    lp = out.choices[0].logprobs
    ref = log_softmax(model.logits(ids).astype(np.float64), axis=-1)     # [T, V]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], [ref[i - 1, ids[i]] for i in range(1, len(ids))],
                               atol=1e-4)
    for i in range(1, len(ids)):                            # the two best alternatives at each position
        np.testing.assert_allclose(sorted(lp.top_logprobs[i].values(), reverse=True),
                                   np.sort(ref[i - 1])[::-1][:len(lp.top_logprobs[i])], atol=1e-4)
    assert len(lp.tokens) == len(ids) + 1 and out.choices[0].text.startswith(prompt)
    assert [out.choices[0].text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
    # The same through token ids.
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=0,
                                       echo=True)
    np.testing.assert_allclose(by_ids.choices[0].logprobs.token_logprobs[1:len(ids)], lp.token_logprobs[1:len(ids)],
                               atol=1e-6)


def test_openai_chat_completions(server, model):
    client = oai(server)
    messages = [{"role": "user", "content": "Treatment of gout?"}]
    ref = model.generate_text("Treatment of gout?", template="llama2", max_new_tokens=NEW, temperature=0.0)
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=NEW, temperature=0)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=NEW, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_models_lists_the_served_model(server):
    assert [m.id for m in oai(server).models.list()] == ["tiny"]


# -- continuous batching -----------------------------------------------------------------------------------------
def run_threads(fn, args):
    out, errors = [None] * len(args), []

    def work(k):
        try:
            out[k] = fn(args[k])
        except Exception as e:                  # reported below, with the request that failed
            errors.append((args[k], e))
    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return out


def test_concurrent_greedy_equals_sequential(server, tgi, greedy_texts):
    client = tgi

    def one(p):
        return client.text_generation(p, max_new_tokens=NEW)
    sequential = [one(p) for p in PROMPTS]
    concurrent = run_threads(one, PROMPTS)
    assert concurrent == sequential == [greedy_texts[p] for p in PROMPTS]
    metrics = httpx.get(server + "/metrics").text
    assert max_batch_seen(metrics) > 1                      # they did share passes


def max_batch_seen(metrics):
    """The largest batch-size bucket that is not empty (buckets are cumulative)."""
    buckets = [(float(le), int(n)) for le, n in re.findall(r'tinyllama_batch_size_bucket\{le="([0-9.]+)"\} (\d+)',
                                                             metrics)]
    below = 0
    for le, n in buckets:
        if n > below:
            biggest = le
        below = n
    return biggest


def test_seed_gives_the_same_text_alone_and_in_a_batch(server):
    client = oai(server)

    def sampled(prompt, seed):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0.9, seed=seed,
                                         top_p=0.95).choices[0].text
    alone = sampled("Cough", 123)
    together = run_threads(lambda a: sampled(*a), [("Cough", 123), ("Fever", 1), ("Hello", 2), ("Cough", 123)])
    assert together[0] == together[3] == alone
    # n choices of one seeded request are seeds 123, 124, ...: the first is the text above.
    many = client.completions.create(model="tiny", prompt="Cough", max_tokens=NEW, temperature=0.9, seed=123,
                                     top_p=0.95, n=3)
    texts = [c.text for c in sorted(many.choices, key=lambda c: c.index)]
    assert texts[0] == alone and texts[1] == sampled("Cough", 124) and len(set(texts)) > 1


# -- bad input -----------------------------------------------------------------------------------------------------
TGI_BAD = [
    (b'{"inputs": "x", "parameters": {', 422, "not valid JSON"),
    ({"inputs": "x", "parameters": {"max_new_tokens": "ten"}}, 422, "max_new_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": -5}}, 422, "strictly positive"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 10**9}}, 422, "exceed the context"),
    ({"inputs": "x", "parameters": {"max_new_token": 5}}, 422, "unknown field"),
    ({"inputs": "fever " * 600, "parameters": {"max_new_tokens": 5}}, 422, "context"),
    ({"inputs": "x", "parameters": {"temperature": -1.0}}, 422, "temperature"),
    ({"inputs": "x", "parameters": {"top_p": 1.5}}, 422, "top_p"),
    ({"inputs": 5}, 422, "inputs"),
    ({"inputs": "x", "parameters": {"best_of": 3}}, 422, "not supported"),
]

OPENAI_BAD = [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", {"model": "tiny", "prompt": [5, 99999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "not served"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400, "exceed the context"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n must be"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "empty"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "not served"),
]


def post(url, body):
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    return httpx.post(url, json=body, timeout=60)


@pytest.mark.parametrize("body,status,message", TGI_BAD)
def test_tgi_bad_input(server, body, status, message):
    r = post(server + "/generate", body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error_type"] == "validation" and message in err["error"], err


@pytest.mark.parametrize("route,body,status,message", OPENAI_BAD)
def test_openai_bad_input(server, route, body, status, message):
    r = post(server + route, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and set(err) >= {"message", "type", "code"}, err


def test_bad_input_through_the_clients_then_a_good_request(server, tgi, greedy_texts):
    import openai
    from huggingface_hub.errors import ValidationError
    with pytest.raises(openai.NotFoundError, match="not served"):
        oai(server).completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        oai(server).completions.create(model="tiny", prompt=[1, 10**6], max_tokens=2)
    with pytest.raises(ValidationError, match="exceed the context"):
        tgi.text_generation("x", max_new_tokens=10**6)
    assert httpx.get(server + "/nowhere").json()["error_type"] == "not_found"
    assert tgi.text_generation(PROMPTS[4], max_new_tokens=NEW) == greedy_texts[PROMPTS[4]]


# -- lm-evaluation-harness -------------------------------------------------------------------------------------
ITEMS = [
    {"question": "What lowers a fever?", "options": ["aspirin", "sugar", "running"], "answer": 0},
    {"question": "Which organ pumps blood?", "options": ["heart", "liver"], "answer": 0},
    {"question": "What treats a bacterial infection?", "options": ["rest", "antibiotics", "water", "salt"],
     "answer": 1},
]


def test_lm_eval_local_completions_scores_like_the_project(server, ckpt, model, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{options}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": server + "/v1/completions", "model": "tiny", "tokenizer_backend": "huggingface",
                    "tokenizer": ckpt, "add_bos_token": True, "num_concurrent": 2, "max_retries": 1},
        tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ITEMS)
    for sample, it in zip(samples, ITEMS):
        got = [resp[0][0] for resp in sample["resps"]]               # (loglikelihood, is_greedy) per option
        ours = score_item(model.model, model.tokenizer, Item(it["question"], it["options"], it["answer"]))
        np.testing.assert_allclose(got, ours["loglik"], atol=1e-3)


# -- load ----------------------------------------------------------------------------------------------------------
def requests_total(metrics, route):
    pattern = rf'tinyllama_requests_total\{{route="{re.escape(route)}",status="\d+"\}} (\d+)'
    return sum(int(n) for n in re.findall(pattern, metrics))


def test_bounded_load_loses_nothing(server):
    before = httpx.get(server + "/metrics").text
    n_requests, t_limit = 36, 240
    start = time.time()

    def one(k):
        if time.time() - start > t_limit:
            return "skipped"
        if k % 2:
            r = httpx.post(server + "/generate", json={"inputs": f"Patient {k}", "parameters": {"max_new_tokens": 4}},
                           timeout=t_limit)
            return "ok" if r.status_code == 200 and "generated_text" in r.json() else \
                ("503" if r.status_code == 503 else f"bad {r.status_code} {r.text}")
        r = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": f"Fever {k}", "max_tokens": 4,
                                                         "temperature": 0}, timeout=t_limit)
        return "ok" if r.status_code == 200 and r.json()["choices"][0]["text"] is not None else \
            ("503" if r.status_code == 503 else f"bad {r.status_code} {r.text}")

    results = []
    lock = threading.Lock()

    def worker(ks):
        for k in ks:
            res = one(k)
            with lock:
                results.append(res)
    threads = [threading.Thread(target=worker, args=(range(w, n_requests, 12),)) for w in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(t_limit + 60)
    assert len(results) == n_requests and all(r in ("ok", "503") for r in results), results
    after = httpx.get(server + "/metrics").text
    for route, sent in (("/generate", n_requests // 2), ("/v1/completions", n_requests // 2)):
        assert requests_total(after, route) - requests_total(before, route) == sent
    assert re.search(r"^tinyllama_queue_depth 0$", after, re.M)
