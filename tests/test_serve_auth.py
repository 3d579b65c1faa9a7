"""--api-key, --cors-origin and Retry-After, against a real server (and the 503 while loading in-process, where
it can be caught without timing)."""

import httpx
import pytest

from test_serve import make_checkpoint, start_server, stop_server

KEY = "s3cret-key"
ORIGIN = "http://localhost:3000"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # --max-queue 0: every generation request is refused as overloaded, a 503 that needs no timing.
    ckpt = make_checkpoint(str(tmp_path_factory.mktemp("auth") / "tiny-gptq"))
    proc, url = start_server(ckpt, "--model-name", "tiny", "--api-key", KEY, "--cors-origin", ORIGIN,
                             "--max-queue", 0)
    try:
        yield url
    finally:
        code, err = stop_server(proc)
    assert code == 0, err


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": KEY}])
def test_requests_without_the_key_get_401(server, headers):
    r = httpx.post(server + "/generate", json={"inputs": "x"}, headers=headers)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json()["error_type"] == "unauthorized" and KEY not in r.text
    r = httpx.post(server + "/v1/completions", json={"prompt": "x"}, headers=headers)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/info", headers=headers).status_code == 401
    assert httpx.post(server + "/tokenize", json={"content": "x"}, headers=headers).status_code == 401


def test_the_key_opens_every_route_and_probes_need_none(server):
    import openai
    assert httpx.get(server + "/info", headers=AUTH).status_code == 200
    assert httpx.post(server + "/tokenize", json={"content": "x"}, headers=AUTH).status_code == 200
    assert [m.id for m in openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0).models.list()] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(server + "/health").status_code == 200
    assert httpx.get(server + "/metrics").status_code == 200


def test_inference_client_sends_the_key(server, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert InferenceClient(server, api_key=KEY, provider="hf-inference").get_endpoint_info()["model_id"] == "tiny"


def test_every_503_says_when_to_retry(server):
    r = httpx.post(server + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}, headers=AUTH)
    assert r.status_code == 503 and r.json()["error_type"] == "overloaded" and r.headers["Retry-After"] == "1"
    r = httpx.post(server + "/v1/chat/completions", headers=AUTH,
                   json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"


def test_a_loading_server_answers_503_with_retry_after():
    from starlette.testclient import TestClient
    from tinyllama_ref.serve.app import create_app
    from tinyllama_ref.serve.server import Options, ServerState
    state = ServerState(Options(checkpoint="not-loaded-yet"), log=lambda line: None)    # never started
    client = TestClient(create_app(state))
    for r in (client.get("/health"), client.post("/generate", json={"inputs": "x"}),
              client.post("/tokenize", json={"inputs": "x"})):
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text


def test_browser_preflight_and_cors_headers(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(server + "/v1/chat/completions", headers=preflight)     # a preflight carries no key
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    r = httpx.options(server + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert r.status_code == 400 and "Access-Control-Allow-Origin" not in r.headers
    # The real request, and a 401, both carry the header that lets the page read them.
    r = httpx.get(server + "/v1/models", headers={**AUTH, "Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    r = httpx.get(server + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_api_key_from_the_environment(monkeypatch):
    from tinyllama_ref.cli.serve import serve
    monkeypatch.setenv("TINYLLAMA_API_KEY", "from-env")
    ctx = serve.make_context("serve", ["ckpt", "--cors-origin", "http://a", "--cors-origin", "http://b"])
    assert ctx.params["api_key"] == "from-env" and ctx.params["cors_origins"] == ("http://a", "http://b")
