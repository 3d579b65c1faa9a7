"""OpenAI's routes: GET /v1/models, POST /v1/completions (the legacy API), POST /v1/chat/completions.

Completions take a prompt as text, a list of texts, token ids, or a list of token-id lists; every prompt gets
n choices, indexed prompt by prompt. `logprobs: k` with `echo: true` returns the legacy
{tokens, token_logprobs, top_logprobs, text_offset} for the prompt's tokens too (the first has None): this is
how lm-evaluation-harness's local-completions model scores multiple choice. Logprobs are the model's own
log-softmax, before any sampling filter. Chat messages go through the server's chat template (--template).
"""

import json
import time
import uuid
from typing import List, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from ..errors import TinyLlamaError
from ..sampling import SamplingParams
from ..templates import encode_chat, stop_conditions
from .bridge import Events, client_gone
from .jobs import Finished, Job, ServeError, Token
from .server import token_pieces, token_text

DEFAULT_MAX_TOKENS = 16               # the legacy completions API's default
MAX_LOGPROBS = 5
MAX_N = 16
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}

router = APIRouter(prefix="/v1")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: Optional[str] = None
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = DEFAULT_MAX_TOKENS
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    n: int = 1
    stream: bool = False
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: Union[str, List[dict], None] = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: Optional[str] = None
    messages: List[Message]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    n: int = 1
    stream: bool = False
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    logprobs: Optional[bool] = None
    tools: Optional[list] = None


def sampling(body):
    try:
        return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, top_k=0, seed=body.seed)
    except TinyLlamaError as e:
        raise ServeError(str(e)) from None


def stop_list(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ServeError(f"stop has {len(stops)} sequences; at most 4 are allowed")
    return stops


def check_n(n):
    if not 1 <= n <= MAX_N:
        raise ServeError(f"n must be between 1 and {MAX_N}, got {n}")


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


def usage(jobs, results):
    prompt = sum(len(j.prompt_ids) for j in jobs)
    completion = sum(len(r.finished.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj):
    return f"data: {json.dumps(obj)}\n\n"


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
    check_n(body.n)
    if body.best_of not in (None, 1) or body.suffix:
        raise ServeError("best_of and suffix are not supported by this server")
    k = body.logprobs
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise ServeError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {k}")
    if body.echo and body.stream:
        raise ServeError("echo is not supported together with stream")
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise ServeError("max_tokens must be at least 1 (0 only makes sense with echo)")
    params, stops = sampling(body), stop_list(body.stop)
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
        async def lines():
            try:
                async for i, event in events.stream(request):
                    if isinstance(event, Token):
                        lp = None if k is None else logprobs_json(state, [event.id], [event.text], [event.logprob],
                                                                  [event.top], 0)
                        yield sse({**head, "choices": [{"index": i, "text": event.text, "logprobs": lp,
                                                        "finish_reason": None}]})
                    elif isinstance(event, Finished):
                        yield sse({**head, "choices": [{"index": i, "text": "", "logprobs": None,
                                                        "finish_reason": FINISH[event.finish_reason]}]})
            except ServeError as e:
                yield sse(openai_error(e))
            yield "data: [DONE]\n\n"
        return StreamingResponse(lines(), media_type="text/event-stream")
    results = await events.collect(request)
    if results is None:
        return client_gone()
    choices = [completion_choice(state, j, r, i, body.echo, k) for i, (j, r) in enumerate(zip(jobs, results))]
    return {**head, "choices": choices, "usage": usage(jobs, results)}


def message_dicts(messages):
    """OpenAI messages -> the templates' {"role", "content": str}; text parts of a content list are joined."""
    out = []
    for k, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise ServeError(f"message {k}: only text content parts are supported")
            content = "".join(str(part.get("text", "")) for part in content)
        out.append({"role": m.role, "content": content or ""})
    return out


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    state = request.app.state.server
    scheduler = state.ready()
    state.check_model(body.model)
    check_n(body.n)
    if body.tools:
        raise ServeError("tools are not supported by this server")
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
        raise ServeError(f"max_tokens must be at least 1, got {max_tokens}")
    state.check_length(ids, max_tokens, "max_tokens")
    template_stops, stop_ids = stop_conditions(state.template, tokenizer)
    params = sampling(body)
    jobs = [Job(prompt_ids=ids, max_new_tokens=max_tokens, params=p, stop_ids=frozenset(stop_ids),
                stop_strings=tuple(stop_list(body.stop) + template_stops)) for p in choice_seeds(params, body.n)]
    events = Events(jobs)
    scheduler.submit(jobs)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.name,
            "system_fingerprint": None}
    if body.stream:
        async def lines():
            chunk = {**head, "object": "chat.completion.chunk"}
            for i in range(len(jobs)):
                yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
            try:
                async for i, event in events.stream(request):
                    if isinstance(event, Token) and event.text:
                        yield sse({**chunk, "choices": [{"index": i, "delta": {"content": event.text},
                                                         "logprobs": None, "finish_reason": None}]})
                    elif isinstance(event, Finished):
                        yield sse({**chunk, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                         "finish_reason": FINISH[event.finish_reason]}]})
            except ServeError as e:
                yield sse(openai_error(e))
            yield "data: [DONE]\n\n"
        return StreamingResponse(lines(), media_type="text/event-stream")
    results = await events.collect(request)
    if results is None:
        return client_gone()
    choices = [{"index": i, "message": {"role": "assistant", "content": r.finished.text}, "logprobs": None,
                "finish_reason": FINISH[r.finished.finish_reason]} for i, r in enumerate(results)]
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage(jobs, results)}


OPENAI_TYPES = {"validation": ("invalid_request_error", 400), "not_found": ("invalid_request_error", 404),
                "overloaded": ("server_error", 503), "unavailable": ("server_error", 503),
                "generation": ("server_error", 500)}


def openai_error(e):
    kind = e.kind if isinstance(e, ServeError) else "validation"
    code = {"not_found": "model_not_found"}.get(kind, kind)
    return {"error": {"message": str(e), "type": OPENAI_TYPES[kind][0], "param": None, "code": code}}


def openai_status(e):
    return OPENAI_TYPES[e.kind if isinstance(e, ServeError) else "validation"][1]
