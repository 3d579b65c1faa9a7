"""OpenAI's routes: GET /v1/models, POST /v1/completions (the legacy API), POST /v1/chat/completions.

Completions take a prompt as text, a list of texts, token ids, or a list of token-id lists; every prompt gets
n choices, indexed prompt by prompt. `logprobs: k` with `echo: true` returns the legacy
{tokens, token_logprobs, top_logprobs, text_offset} for the prompt's tokens too (the first has None): this is
how lm-evaluation-harness's local-completions model scores multiple choice. Chat answers `logprobs: true`
(with `top_logprobs: k`) with {"content": [{token, logprob, bytes, top_logprobs}]}. Logprobs are the model's
own log-softmax, before any penalty, bias or sampling filter. Chat messages go through the server's chat
template (--template).

Which fields each route takes, and which it refuses, is in openai_requests.py.
"""

import json
import time
import uuid
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..errors import TinyLlamaError
from ..templates import encode_chat, stop_conditions
from .bridge import Events, client_gone
from .fields import field_error, refuse_unsupported
from .jobs import Finished, Job, ServeError, Token
from .openai_requests import (CHAT_OFF, COMPLETION_OFF, DEFAULT_MAX_TOKENS, ChatRequest, CompletionRequest,
                              include_usage, sampling)
from .server import token_pieces, token_text

MAX_LOGPROBS = 5                      # legacy completions' limit
MAX_TOP_LOGPROBS = 20                 # chat's limit
MAX_N = 16
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}

router = APIRouter(prefix="/v1")


def stop_list(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise field_error("stop", f"stop has {len(stops)} sequences; at most 4 are allowed")
    return stops


def check_n(n):
    if not 1 <= n <= MAX_N:
        raise field_error("n", f"n must be between 1 and {MAX_N}, got {n}")


def choice_seeds(params, n):
    """n choices with one seed give n different texts, each reproducible: seed, seed + 1, ..."""
    if params.seed is None or params.greedy:
        return [params] * n
    return [params.with_seed(params.seed + k) for k in range(n)]


def prompts_of(state, prompt):
    """(ids, text) per prompt; text is None when the prompt came as ids."""
    tokenizer = state.model.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ServeError("prompt is empty: give some text or at least one token id")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((tokenizer.encode(p, add_bos=True), p))
        else:
            out.append((state.check_ids(list(p)), None))
    return out


def logprobs_json(state, ids, pieces, lps, tops, offset0):
    """The legacy logprobs object for consecutive tokens, text offsets starting at offset0."""
    tokenizer = state.model.tokenizer
    offsets, at = [], offset0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    top = [None if t is None else {token_text(tokenizer, i): lp for i, lp in t} for t in tops]
    return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def completion_choice(state, job, r, index, echo, k):
    prompt_text = "".join(token_pieces(state.model.tokenizer, job.prompt_ids)) if echo else ""
    choice = {"index": index, "text": prompt_text + r.finished.text, "logprobs": None,
              "finish_reason": FINISH[r.finished.finish_reason]}
    if k is not None:
        ids, pieces, lps, tops = [], [], [], []
        if echo:
            ids += job.prompt_ids
            pieces += token_pieces(state.model.tokenizer, job.prompt_ids)
            lps += r.prompt.logprobs
            tops += r.prompt.top
        for t in r.tokens:
            ids.append(t.id)
            pieces.append(t.text)
            lps.append(t.logprob)
            tops.append(t.top)
        choice["logprobs"] = logprobs_json(state, ids, pieces, lps, tops, 0)
    return choice


def usage(jobs, finished):
    """OpenAI's usage from the jobs and their Finished events (every choice's prompt counts, as OpenAI's)."""
    prompt = sum(len(j.prompt_ids) for j in jobs)
    completion = sum(len(f.token_ids) for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj):
    return f"data: {json.dumps(obj)}\n\n"


def sse_answer(chunks, head, jobs, with_usage):
    """Server-sent events from the chunk generator, then the usage chunk when asked for, then [DONE].
    chunks yields (choice index, event, dict or None); a Finished event's dict is the choice's last."""
    async def lines():
        finished = []
        try:
            async for i, event, choice in chunks:
                if isinstance(event, Finished):
                    finished.append(event)
                if choice is not None:
                    yield sse({**head, "choices": [{"index": i, **choice}], **({"usage": None} if with_usage else {})})
            if with_usage:
                yield sse({**head, "choices": [], "usage": usage(jobs, finished)})
        except ServeError as e:
            yield sse(openai_error(e))
        yield "data: [DONE]\n\n"
    return StreamingResponse(lines(), media_type="text/event-stream")


@router.get("/models")
async def models(request: Request):
    state = request.app.state.server
    return {"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                        "owned_by": "tinyllama-ref"}]}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state.server
    scheduler = state.ready()
    state.check_model(body.model)
    refuse_unsupported(body, COMPLETION_OFF)
    check_n(body.n)
    k = body.logprobs
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise field_error("logprobs", f"logprobs must be between 0 and {MAX_LOGPROBS}, got {k}")
    if body.echo and body.stream:
        raise field_error("echo", "echo is not supported together with stream")
    with_usage = include_usage(body)
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise field_error("max_tokens", "max_tokens must be at least 1 (0 only makes sense with echo)")
    params, stops = sampling(state, body), stop_list(body.stop)
    eos = frozenset(state.model.tokenizer.eos_ids)
    jobs = []
    for ids, _ in prompts_of(state, body.prompt):
        state.check_ids(ids)
        state.check_length(ids, max_tokens, "max_tokens")
        for p in choice_seeds(params, body.n):
            jobs.append(Job(prompt_ids=ids, max_new_tokens=max_tokens, params=p, stop_ids=eos,
                            stop_strings=tuple(stops), prompt_logprobs=k if body.echo and k is not None else -1,
                            top_logprobs=-1 if k is None else k))
    events = Events(jobs)
    scheduler.submit(jobs)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.name}
    if body.stream:
        async def chunks():
            async for i, event in events.stream(request):
                if isinstance(event, Token):
                    lp = None if k is None else logprobs_json(state, [event.id], [event.text], [event.logprob],
                                                              [event.top], 0)
                    yield i, event, {"text": event.text, "logprobs": lp, "finish_reason": None}
                elif isinstance(event, Finished):
                    yield i, event, {"text": "", "logprobs": None, "finish_reason": FINISH[event.finish_reason]}
        return sse_answer(chunks(), head, jobs, with_usage)
    results = await events.collect(request)
    if results is None:
        return client_gone()
    choices = [completion_choice(state, j, r, i, body.echo, k) for i, (j, r) in enumerate(zip(jobs, results))]
    return {**head, "choices": choices, "usage": usage(jobs, [r.finished for r in results])}


def message_dicts(messages):
    """OpenAI messages -> the templates' {"role", "content": str}; text parts of a content list are joined."""
    out = []
    for k, m in enumerate(messages):
        if m.name is not None:
            raise field_error("messages", f"message {k}: name is not supported by this server's chat templates")
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise field_error("messages", f"message {k}: only text content parts are supported")
            content = "".join(str(part.get("text", "")) for part in content)
        out.append({"role": m.role, "content": content or ""})
    return out


def token_entry(tokenizer, i, logprob):
    """Chat logprobs' {token, logprob, bytes} for one token id: its own text out of context, and its bytes
    (a byte-fallback piece such as <0xE2> is that one byte, which need not be valid UTF-8 alone)."""
    piece = token_text(tokenizer, i)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        raw = bytes([int(piece[3:5], 16)])
        piece = raw.decode("utf-8", errors="backslashreplace")
    else:
        raw = piece.encode("utf-8")
    return {"token": piece, "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer, tokens, stop_ids):
    """{"content": [...]} for the generated tokens; a stop token (</s>, <|im_end|>) is not content."""
    content = []
    for t in tokens:
        if t.id in stop_ids:
            continue
        entry = token_entry(tokenizer, t.id, t.logprob)
        entry["top_logprobs"] = [token_entry(tokenizer, i, lp) for i, lp in (t.top or [])]
        content.append(entry)
    return {"content": content, "refusal": None}


def chat_top_logprobs(body):
    """-1 (no logprobs), or how many alternatives each token shows: OpenAI's rules for the two fields."""
    top = body.top_logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise field_error("top_logprobs", f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top}")
    if not body.logprobs:
        if top:
            raise field_error("top_logprobs", "top_logprobs needs logprobs set to true")
        return -1
    return top or 0


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    state = request.app.state.server
    scheduler = state.ready()
    state.check_model(body.model)
    refuse_unsupported(body, CHAT_OFF)
    check_n(body.n)
    top = chat_top_logprobs(body)
    with_usage = include_usage(body)
    tokenizer = state.model.tokenizer
    try:
        ids = encode_chat(tokenizer, message_dicts(body.messages), state.template)
        tokenizer.check_ids(ids)
    except TinyLlamaError as e:
        raise ServeError(str(e)) from None
    state.check_ids(ids)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = max(state.max_context - len(ids), 0)    # as OpenAI: up to the end of the context
    if max_tokens <= 0:
        state.check_length(ids, 1, "max_tokens")
        raise field_error("max_tokens", f"max_tokens must be at least 1, got {max_tokens}")
    state.check_length(ids, max_tokens, "max_tokens")
    template_stops, stop_ids = stop_conditions(state.template, tokenizer)
    stop_ids = frozenset(stop_ids)
    params = sampling(state, body)
    jobs = [Job(prompt_ids=ids, max_new_tokens=max_tokens, params=p, stop_ids=stop_ids,
                stop_strings=tuple(stop_list(body.stop) + template_stops), top_logprobs=top)
            for p in choice_seeds(params, body.n)]
    events = Events(jobs)
    scheduler.submit(jobs)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.name,
            "system_fingerprint": None}
    if body.stream:
        async def chunks():
            for i in range(len(jobs)):
                yield i, None, {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}
            async for i, event in events.stream(request):
                if isinstance(event, Token) and (event.text or (top >= 0 and event.id not in stop_ids)):
                    lp = chat_logprobs(tokenizer, [event], stop_ids) if top >= 0 else None
                    yield i, event, {"delta": {"content": event.text}, "logprobs": lp, "finish_reason": None}
                elif isinstance(event, Finished):
                    yield i, event, {"delta": {}, "logprobs": None, "finish_reason": FINISH[event.finish_reason]}
        return sse_answer(chunks(), {**head, "object": "chat.completion.chunk"}, jobs, with_usage)
    results = await events.collect(request)
    if results is None:
        return client_gone()
    choices = [{"index": i, "message": {"role": "assistant", "content": r.finished.text},
                "logprobs": chat_logprobs(tokenizer, r.tokens, stop_ids) if top >= 0 else None,
                "finish_reason": FINISH[r.finished.finish_reason]} for i, r in enumerate(results)]
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": usage(jobs, [r.finished for r in results])}


OPENAI_TYPES = {"validation": ("invalid_request_error", 400), "not_found": ("invalid_request_error", 404),
                "overloaded": ("server_error", 503), "unavailable": ("server_error", 503),
                "generation": ("server_error", 500), "unauthorized": ("invalid_request_error", 401)}


def openai_error(e):
    kind = e.kind if isinstance(e, ServeError) else "validation"
    code = {"not_found": "model_not_found", "unauthorized": "invalid_api_key"}.get(kind, kind)
    return {"error": {"message": str(e), "type": OPENAI_TYPES[kind][0], "param": getattr(e, "param", None),
                      "code": code}}


def openai_status(e):
    return OPENAI_TYPES[e.kind if isinstance(e, ServeError) else "validation"][1]
