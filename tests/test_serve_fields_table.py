"""docs/serving.md's table of request fields, posted row by row to a real server: a field marked "works" is
answered 200, one marked "refused" is a 4xx whose message names it. The list comes from the docs, so the docs
and the server cannot drift apart; the other way round, every field the request models declare must have a
row."""

import json
import os
import re

import httpx
import pytest

from test_serve import make_checkpoint, start_server, stop_server

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "serving.md")
BASE = {
    "/v1/completions": {"model": "tiny", "prompt": "Fever", "max_tokens": 2},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/generate": {"inputs": "Fever", "parameters": {"max_new_tokens": 2}},
    "/generate_stream": {"inputs": "Fever", "parameters": {"max_new_tokens": 2}},
    "/tokenize": {},                              # two shapes: the examples are whole bodies
    "/detokenize": {},
}


def table_rows():
    """(field, route, example dict, "works" | "refused") for every row and route of the fields table."""
    with open(DOCS, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Request fields", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[2].startswith("`{"):
            continue
        field, routes, example, we = cells
        verdict = we.split(":")[0].split(" ")[0]
        assert verdict in ("works", "refused"), line
        for route in routes.split(", "):
            rows.append((field.strip("`"), route, json.loads(example.strip("`")), verdict))
    return rows


ROWS = table_rows()


def merged(base, extra):
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def leaf_names(example):
    """The innermost keys of an example: what a refusal must name."""
    names = []
    for key, value in example.items():
        names += leaf_names(value) if isinstance(value, dict) and key == "parameters" else [key]
    return names


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_checkpoint(str(tmp_path_factory.mktemp("fields_table") / "tiny-gptq"))
    proc, url = start_server(ckpt, "--template", "llama2", "--model-name", "tiny")
    try:
        yield url
    finally:
        code, err = stop_server(proc)
    assert code == 0, err


def test_the_table_covers_every_route_and_both_verdicts():
    assert {route for _, route, _, _ in ROWS} == set(BASE)
    assert {verdict for *_, verdict in ROWS} == {"works", "refused"}
    assert len(ROWS) > 70


def test_every_declared_field_has_a_row():
    from tinyllama_ref.serve import openai_requests, tgi, tokenize
    documented = {(f.split(".")[-1], r) for f, r, _, _ in ROWS}
    for model, route in ((openai_requests.CompletionRequest, "/v1/completions"),
                         (openai_requests.ChatRequest, "/v1/chat/completions"),
                         (tgi.Parameters, "/generate"), (tgi.Parameters, "/generate_stream"),
                         (tokenize.TgiTokenize, "/tokenize"), (tokenize.LlamaTokenize, "/tokenize"),
                         (tokenize.Detokenize, "/detokenize")):
        declared = set(model.model_fields)
        if model is tgi.Parameters:
            declared |= set(tgi.GenerateRequest.model_fields) - {"parameters"}
        missing = declared - {f for f, r in documented if r == route}
        assert not missing, f"{route}: fields without a row in docs/serving.md: {sorted(missing)}"


@pytest.mark.parametrize("field,route,example,verdict", ROWS,
                         ids=[f"{r}:{f}" if f != "any other" else f"{r}:{e}" for f, r, e, _ in ROWS])
def test_each_documented_field_is_honoured_or_refused(server, field, route, example, verdict):
    r = httpx.post(server + route, json=merged(BASE[route], example), timeout=120)
    if verdict == "works":
        assert r.status_code == 200, r.text
        assert '"error"' not in r.text, r.text              # a stream reports a late error as an event
        return
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    name = leaf_names(example)[-1] if field == "any other" else re.split(r"[.\]]", field)[-1]
    assert name in message, (name, message)
    if route.startswith("/v1/"):
        assert r.status_code == 400 and error["type"] == "invalid_request_error"
    else:
        assert r.status_code == 422 and r.json()["error_type"] == "validation"
