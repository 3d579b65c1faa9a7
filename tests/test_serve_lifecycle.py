"""The server's life: /health while loading, a full queue, SIGTERM with requests in flight, a missing extra,
a checkpoint that does not load; and the scheduler's interleaving of a long prefill with decoding."""

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import tinyllama_ref
from tinyllama_ref.sampling import SamplingParams
from tinyllama_ref.serve.jobs import Finished, Job, Token

from test_serve import make_checkpoint, start_server, stop_server


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("serve_life") / "tiny-gptq"))


def metric(url, name):
    m = re.search(rf"^{name} (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1))


def wait_for(condition, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_disconnects_full_queue_and_sigterm(ckpt):
    # The numpy reference backend is slow (400 tokens take half a minute here): a request that is still
    # running a few seconds later is one the server did not give up on.
    proc, url = start_server(ckpt, "--max-batch", 1, "--max-queue", 1, "--shutdown-timeout", 3, backend="numpy")
    try:
        long_request = {"inputs": "The patient", "parameters": {"max_new_tokens": 400}}

        # A client that hangs up frees its slot at the next pass, streaming or not.
        with httpx.stream("POST", url + "/generate_stream", json=long_request) as r:
            next(r.iter_lines())                           # one token arrived; now hang up
        wait_for(lambda: metric(url, "tinyllama_active_sequences") == 0, 10)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/generate", json=long_request, timeout=1.5)
        wait_for(lambda: metric(url, "tinyllama_active_sequences") == 0, 10)
        assert 'tinyllama_requests_total{route="/generate",status="499"} 1' in httpx.get(url + "/metrics").text

        stream_events, waiting = [], {}

        def long_stream():                     # holds the only slot: greedy runs 400 tokens here without EOS
            with httpx.stream("POST", url + "/generate_stream", timeout=120, json=long_request) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        stream_events.append(json.loads(line[5:]))

        def queued():
            waiting["response"] = httpx.post(url + "/generate", timeout=120,
                                             json={"inputs": "Fever", "parameters": {"max_new_tokens": 5}})
        a = threading.Thread(target=long_stream)
        a.start()
        wait_for(lambda: len(stream_events) > 0)
        b = threading.Thread(target=queued)
        b.start()
        wait_for(lambda: metric(url, "tinyllama_queue_depth") == 1)

        r = httpx.post(url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 503 and r.json()["error_type"] == "overloaded" and "overloaded" in r.json()["error"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "overloaded" in r.json()["error"]["message"]

        t = time.time()
        code, err = stop_server(proc, timeout=30)
        a.join(30)
        b.join(30)
        assert code == 0, err
        assert time.time() - t < 20
        assert waiting["response"].status_code == 503 and "shutting down" in waiting["response"].json()["error"]
        last = stream_events[-1]                 # the running stream got its 3 s of grace, then an error event
        assert last.get("error_type") == "unavailable" and "shutting down" in last["error"], last
        assert all("token" in e for e in stream_events[:-1]) and len(stream_events) > 1
        assert "Traceback" not in err
        assert re.search(r"request \d+: 4 prompt tokens, \d+ new tokens, [0-9.]+ s, shutdown", err), err
        assert "serving tiny-gptq at http://127.0.0.1:" in err and "KV cache 1 sequences x 512 positions" in err
        assert err.rstrip().endswith("stopped")
    finally:
        stop_server(proc, timeout=30)            # a no-op when the test got that far


def test_health_is_503_while_loading(ckpt):
    from tinyllama_ref.serve.app import create_app
    from tinyllama_ref.serve.server import Options, ServerState
    app = create_app(ServerState(Options(checkpoint=ckpt)))           # never started: still "loading"

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return (await c.get("/health"), await c.post("/v1/completions", json={"prompt": "x"}),
                    await c.post("/generate", json={"inputs": "x"}))
    health, completion, generate = asyncio.run(ask())
    assert health.status_code == 503 and "loading" in health.json()["error"]
    assert completion.status_code == 503 and "loading" in completion.json()["error"]["message"]
    assert generate.status_code == 503 and generate.json()["error_type"] == "unavailable"


def run_cli(*args, prelude="pass"):
    code = (f"import sys; {prelude}; from tinyllama_ref.cli import main; "
            f"sys.argv = ['tinyllama-ref', *{list(args)!r}]; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_missing_extra_is_one_line():
    r = run_cli("serve", "anything", prelude="sys.modules['fastapi'] = None")   # as if not installed
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: serve needs FastAPI and uvicorn: pip install -e "
                                             "'.[serve]' in the tinyllama-ref source directory"]


def test_busy_port_is_one_line(ckpt):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run_cli("serve", ckpt, "--port", str(busy.getsockname()[1]))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot listen on 127.0.0.1:"), r.stderr
    assert "Traceback" not in r.stderr and "serving" not in r.stderr       # refused before loading


def test_checkpoint_that_does_not_load_exits_1(tmp_path):
    r = run_cli("serve", str(tmp_path / "missing"), "--port", "0", "--backend", "numpy")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert re.search(r"^error: .*missing", r.stderr, re.M), r.stderr


# -- the scheduler, driven pass by pass ---------------------------------------------------------------------------
def test_long_prefill_is_interleaved_with_decoding(ckpt):
    from tinyllama_ref.serve.scheduler import Scheduler
    model = tinyllama_ref.load(ckpt, backend="numpy")
    tok = model.tokenizer
    sch = Scheduler(model, max_batch=2, max_queue=4, prefill_chunk=8)
    events = {"a": [], "b": []}

    def job(text, name, n):
        return Job(prompt_ids=tok.encode(text, add_bos=True), max_new_tokens=n,
                   params=SamplingParams(temperature=0.0), stop_ids=frozenset(), on_event=events[name].append)

    def step():
        with sch.cond:
            sch._admit()
        sch.step()
    a = job("Fever", "a", 12)
    sch.submit([a])
    step()                                                      # A's prompt fits one pass
    b = job("The patient presented with fever and cough; antibiotics were started and it resolved.", "b", 4)
    assert len(b.prompt_ids) > 3 * 8
    sch.submit([b])
    b_passes = 0
    while not any(isinstance(e, Token) for e in events["b"]):
        before = len(events["a"])
        fed_before = next((s.fed for s in sch.active if s.job is b), 0)
        step()
        b_passes += 1
        assert len(events["a"]) == before + 1                   # A got its token in every pass
        fed = next(s.fed for s in sch.active if s.job is b)
        assert fed - fed_before <= 8 - 1                        # the pass held A's token and 7 of B's
    assert b_passes == -(-len(b.prompt_ids) // 7)
    while sch.active:
        step()
    for j, name in ((a, "a"), (b, "b")):                        # and the text is what generate() gives alone
        done = events[name][-1]
        assert isinstance(done, Finished)
        assert done.token_ids == model.generate(j.prompt_ids, max_new_tokens=j.max_new_tokens, stop_ids=[])
    assert sch.free and sorted(sch.free) == [0, 1]
    sch.cache.close()


def test_kv_pool_is_reserved_in_the_budget_whatever_max_batch(ckpt):
    """--max-batch no longer reserves a whole context per slot: the pool is sized by the budget (kvcache.plan_pool),
    reserved in it, and a --max-batch whose contiguous slots would not fit still starts (tests/test_kv_pool.py
    covers the refusals)."""
    from tinyllama_ref.kvcache import KVCache
    from tinyllama_ref.memory import current_rss
    from tinyllama_ref.serve.scheduler import Scheduler
    model = tinyllama_ref.load(ckpt, backend="numpy", max_memory=str(current_rss() + 150 * 10**6))
    c = model.cfg
    per_slot = KVCache.bytes_needed(c.n_layers, 1, c.max_seq_len, c.n_kv_heads, c.head_dim)   # 1 MB here
    many = int(200 * 10**6 // per_slot)                                  # 200 MB of contiguous slots
    sch = Scheduler(model, max_batch=many)
    try:
        reserved = sum(v for k, v in model.layers.reserved.items() if k.startswith("KV"))
        assert 0 < sch.cache.nbytes <= reserved < 150 * 10**6
    finally:
        sch.cache.close()
