"""Request fields through the real clients: openai (chat logprobs, n, seed, penalties, logit_bias,
stream_options, an unknown field), huggingface_hub.InferenceClient (repetition_penalty, top_k, seed,
top_n_tokens, grammar refused) and httpx (/tokenize, /detokenize). Generated tokens are checked against the
same checkpoint run in-process with sampling.Sampler, one forward pass per token."""

import httpx
import numpy as np
import pytest

import tinyllama_ref
from tinyllama_ref.ops import log_softmax
from tinyllama_ref.sampling import Sampler, SamplingParams
from tinyllama_ref.templates import encode_chat

from test_serve import make_checkpoint, oai, start_server, stop_server, tgi  # noqa: F401 (tgi: a fixture)

NEW = 12
CHAT = [{"role": "user", "content": "What lowers a fever?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("fields") / "tiny-gptq"))


@pytest.fixture(scope="module")
def model(ckpt):
    return tinyllama_ref.load(ckpt)


@pytest.fixture(scope="module")
def server(ckpt):
    proc, url = start_server(ckpt, "--template", "llama2", "--model-name", "tiny")
    try:
        yield url
    finally:
        code, err = stop_server(proc)
    assert code == 0, err


def reference(model, ids, params, n=NEW):
    """The new token ids the server should produce: one Sampler, one forward pass per token."""
    sampler, new = Sampler(params), []
    for _ in range(n):
        token = sampler.sample(model.logits(ids + new)[-1], ids + new)
        new.append(token)
        if token in model.tokenizer.eos_ids:
            break
    return new


def continuation(model, ids, new):
    """The text new adds after ids, as the server shows it (special tokens dropped)."""
    stream = model.tokenizer.stream_decoder(skip_special_tokens=True, context_ids=ids)
    return "".join(stream.push(t) for t in new if t not in model.tokenizer.eos_ids) + stream.flush()


# -- OpenAI ------------------------------------------------------------------------------------------------------
def test_chat_logprobs_and_top_logprobs(server, model):
    ids = encode_chat(model.tokenizer, CHAT, "llama2")
    new = reference(model, ids, SamplingParams(temperature=0))
    ref = log_softmax(model.logits(ids + new).astype(np.float64), axis=-1)       # [T, V]
    out = oai(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=NEW, temperature=0,
                                              logprobs=True, top_logprobs=3)
    choice = out.choices[0]
    content = choice.logprobs.content
    shown = [t for t in new if t not in model.tokenizer.eos_ids]
    assert len(content) == len(shown) and choice.message.content == continuation(model, ids, new)
    for k, (entry, token) in enumerate(zip(content, shown)):
        row = ref[len(ids) + k - 1]
        np.testing.assert_allclose(entry.logprob, row[token], atol=1e-4)
        assert len(entry.top_logprobs) == 3
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], np.sort(row)[::-1][:3], atol=1e-4)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)   # greedy: the top one
        assert bytes(entry.bytes) == entry.token.encode("utf-8") or entry.token.startswith("\\x")
    plain = oai(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_n_choices_with_a_seed_reproduce(server):
    client = oai(server)

    def texts(**kw):
        out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=NEW, temperature=1.0, **kw)
        assert sorted(c.index for c in out.choices) == list(range(len(out.choices)))
        return [c.message.content for c in sorted(out.choices, key=lambda c: c.index)]
    three = texts(n=3, seed=42)
    assert len(three) == 3 and len(set(three)) > 1           # seeds 42, 43, 44 give different texts
    assert texts(n=3, seed=42) == three
    assert texts(seed=43) == three[1:2]                        # choice 1 is seed 43 on its own


def test_penalties_follow_the_reference_and_change_the_text(server, model):
    client = oai(server)
    prompt = "The patient presented with fever"
    ids = model.tokenizer.encode(prompt, add_bos=True)
    n = 16

    def text(**kw):
        extra = {k: kw.pop(k) for k in list(kw) if k == "repetition_penalty"}    # not in openai's signature
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, extra_body=extra,
                                         **kw).choices[0].text

    def expected(**kw):
        if "logit_bias" in kw:
            kw["logit_bias"] = tuple((int(t), float(b)) for t, b in kw["logit_bias"].items())
        return continuation(model, ids, reference(model, ids, SamplingParams(temperature=0, **kw), n))
    plain = text()
    assert plain == expected()
    # This random model's greedy text never repeats a token, so a positive penalty alone changes nothing;
    # negative ones make it repeat, and a positive one stops a token that logit_bias made repeat.
    favourite = {str(reference(model, ids, SamplingParams(temperature=0), 1)[0]): 5}
    for kw in (dict(presence_penalty=-2.0), dict(frequency_penalty=-2.0), dict(repetition_penalty=0.5),
               dict(logit_bias=favourite), dict(logit_bias=favourite, frequency_penalty=2.0),
               dict(logit_bias=favourite, presence_penalty=2.0)):
        got = text(**dict(kw))
        assert got == expected(**dict(kw)), kw
        assert got != plain, kw
    assert text(logit_bias=favourite, frequency_penalty=2.0) != text(logit_bias=favourite)


def test_logit_bias_forces_and_bans_tokens(server, model):
    client = oai(server)
    ids = model.tokenizer.encode("Cough", add_bos=True)
    forced = 300
    out = client.completions.create(model="tiny", prompt="Cough", max_tokens=4, temperature=1.0, seed=5,
                                    logit_bias={str(forced): 100})
    assert out.choices[0].text == continuation(model, ids, [forced] * 4)
    first = reference(model, ids, SamplingParams(temperature=0), 1)[0]
    banned = client.completions.create(model="tiny", prompt="Cough", max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(first): -100})
    expected = reference(model, ids, SamplingParams(temperature=0, logit_bias=((first, -100.0),)), 1)
    assert banned.choices[0].text == continuation(model, ids, expected) and expected[0] != first


def test_stream_options_include_usage(server, model):
    client = oai(server)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    done = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0)
    assert chunks[-1].usage.model_dump() == done.usage.model_dump()
    chunks = list(client.completions.create(model="tiny", prompt="Fever", max_tokens=3, temperature=0, n=2,
                                            stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and 2 <= usage.completion_tokens <= 6
    assert usage.prompt_tokens == 2 * len(model.tokenizer.encode("Fever", add_bos=True))   # both choices count
    assert usage.completion_tokens == sum(1 for c in chunks if c.choices and c.choices[0].finish_reason is None)
    plain = list(client.completions.create(model="tiny", prompt="Fever", max_tokens=2, temperature=0, stream=True))
    assert all(c.usage is None for c in plain)


def test_unknown_and_unsupported_fields_are_bad_requests(server):
    import openai
    client = oai(server)
    with pytest.raises(openai.BadRequestError, match="frobnicate") as e:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, extra_body={"frobnicate": 1})
    assert e.value.body["param"] == "frobnicate" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2,
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logit_bias={"99999": 5})
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"repetition_penalty": 0})
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, presence_penalty=3)
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, stream_options={"include_usage": True})
    # The off values clients send by default are accepted.
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, tools=[], store=False,
                                         response_format={"type": "text"})
    assert out.choices[0].finish_reason in ("stop", "length")


# -- TGI ---------------------------------------------------------------------------------------------------------
def test_tgi_repetition_penalty_top_k_and_seed(server, tgi, model):   # noqa: F811 (tgi is the fixture)
    prompt = "Treatment with"
    ids = model.tokenizer.encode(prompt, add_bos=True)
    out = tgi.text_generation(prompt, max_new_tokens=NEW, repetition_penalty=1.6, details=True)
    assert [t.id for t in out.details.tokens] == reference(model, ids, SamplingParams(temperature=0,
                                                                                      repetition_penalty=1.6))
    # top_k 1 leaves only the most likely token: greedy whatever the seed.
    greedy = tgi.text_generation(prompt, max_new_tokens=NEW)
    assert tgi.text_generation(prompt, max_new_tokens=NEW, do_sample=True, top_k=1, seed=9) == greedy
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, top_k=20, details=True)
    a, b = tgi.text_generation(prompt, seed=3, **kw), tgi.text_generation(prompt, seed=3, **kw)
    assert a.generated_text == b.generated_text and a.details.seed == 3
    expected = reference(model, ids, SamplingParams(temperature=1.5, top_k=20, seed=3))
    assert [t.id for t in a.details.tokens] == expected


def field(obj, name):
    """huggingface_hub parses some nested lists into dataclasses and leaves others as dicts."""
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def test_tgi_top_n_tokens(server, tgi, model):   # noqa: F811
    out = tgi.text_generation("Fever", max_new_tokens=3, details=True, top_n_tokens=2)
    assert len(out.details.top_tokens) == len(out.details.tokens)
    for token, top in zip(out.details.tokens, out.details.top_tokens):
        assert len(top) == 2 and field(top[0], "id") == token.id                       # greedy: the top one
        assert field(top[0], "logprob") >= field(top[1], "logprob")
    events = list(tgi.text_generation("Fever", max_new_tokens=3, details=True, top_n_tokens=2, stream=True))
    assert [field(e.top_tokens[0], "id") for e in events] == [t.id for t in out.details.tokens]


def test_tgi_unsupported_parameter_is_refused(server, tgi):   # noqa: F811
    from huggingface_hub.errors import ValidationError
    with pytest.raises(ValidationError, match="grammar"):
        tgi.text_generation("Fever", max_new_tokens=2, grammar={"type": "regex", "value": "a+"})
    with pytest.raises(ValidationError, match="typical_p"):
        tgi.text_generation("Fever", max_new_tokens=2, typical_p=0.5)


# -- /tokenize and /detokenize -------------------------------------------------------------------------------------
def test_tokenize_in_tgi_shape(server, model):
    text = "The patient, aged 70, had a fever."
    r = httpx.post(server + "/tokenize", json={"inputs": text})
    assert r.status_code == 200, r.text
    tokens = r.json()
    assert [t["id"] for t in tokens] == model.tokenizer.encode(text, add_bos=True)
    assert (tokens[0]["start"], tokens[0]["stop"], tokens[0]["text"]) == (0, 0, "")      # BOS covers no text
    raw = text.encode("utf-8")
    assert all(raw[t["start"]:t["stop"]].decode() == t["text"] for t in tokens)
    assert "".join(t["text"] for t in tokens) == text                                   # ASCII: they tile it
    assert all(a["stop"] == b["start"] for a, b in zip(tokens[1:], tokens[2:]))
    no_bos = httpx.post(server + "/tokenize", json={"inputs": text, "add_special_tokens": False}).json()
    assert [t["id"] for t in no_bos] == model.tokenizer.encode(text, add_bos=False)


def test_tokenize_and_detokenize_in_llama_server_shape(server, model):
    text = "Aspirin lowers fever; café"
    r = httpx.post(server + "/tokenize", json={"content": text})
    assert r.json() == {"tokens": model.tokenizer.encode(text, add_bos=False)}
    with_bos = httpx.post(server + "/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    assert with_bos == model.tokenizer.encode(text, add_bos=True)
    pieces = httpx.post(server + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == r.json()["tokens"] and "".join(p["piece"] for p in pieces) == text
    back = httpx.post(server + "/detokenize", json={"tokens": r.json()["tokens"]})
    assert back.json() == {"content": text}
    assert httpx.post(server + "/detokenize", json={"tokens": with_bos}).json() == {"content": text}


@pytest.mark.parametrize("body,status,message", [
    ({"text": "x"}, 422, "exactly one"),
    ({"inputs": "x", "content": "x"}, 422, "exactly one"),
    ({"content": "x", "add_bos": True}, 422, "add_bos"),
    ({"inputs": 5}, 422, "inputs"),
])
def test_tokenize_refuses_a_body_of_neither_shape(server, body, status, message):
    r = httpx.post(server + "/tokenize", json=body)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_detokenize_refuses_ids_outside_the_vocabulary(server):
    r = httpx.post(server + "/detokenize", json={"tokens": [1, 10**6]})
    assert r.status_code == 422 and "outside the vocabulary" in r.json()["error"]
