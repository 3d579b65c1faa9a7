"""Text Generation Inference's routes, with the JSON of TGI's router (router/src/lib.rs, server.rs):

    POST /generate          {"inputs", "parameters"} -> {"generated_text", "details"?}
    POST /generate_stream   server-sent events, one per token; the last carries generated_text and details
    POST /                  either of the above by "stream"; the non-streaming answer is wrapped in a list
    GET  /info              what the router reports about the model and its limits

As in TGI, sampling is on when do_sample is true or any of temperature, top_k, top_p is set to a value that
changes the distribution; otherwise decoding is greedy. repetition_penalty and frequency_penalty apply either
way. top_n_tokens returns each new token's most likely alternatives, as TGI's top_tokens.

Unknown fields are refused with 422 naming them. TGI itself ignores them (its router's serde structs do not
deny unknown fields), but an ignored misspelling ("max_new_token") silently gives another answer.
"""

import json
from typing import List, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from .bridge import Events, client_gone
from .fields import field_error, make_params
from .jobs import Finished, Job, PromptDone, ServeError, Token
from .server import token_pieces, token_text

DEFAULT_MAX_NEW_TOKENS = 100          # TGI's default
MAX_STOP_SEQUENCES = 8
MAX_TOP_N_TOKENS = 5                  # TGI's --max-top-n-tokens default
FINISH = {"eos": "eos_token", "stop": "stop_sequence", "length": "length"}

# TGI parameters this server accepts but does not implement: only their "off" value is allowed.
NOT_IMPLEMENTED = {"best_of": (None, 1), "typical_p": (None, 1.0), "watermark": (None, False),
                   "grammar": (None,), "adapter_id": (None,)}

router = APIRouter()


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    max_new_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop: List[str] = Field(default_factory=list)
    seed: Optional[int] = None
    details: bool = False
    return_full_text: Optional[bool] = False
    decoder_input_details: bool = False
    truncate: Optional[int] = None
    best_of: Optional[int] = None
    top_n_tokens: Optional[int] = None
    typical_p: Optional[float] = None
    watermark: Optional[bool] = None
    frequency_penalty: Optional[float] = None
    grammar: Optional[dict] = None
    adapter_id: Optional[str] = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)
    stream: Optional[bool] = None            # POST / only; the other routes refuse a value they contradict


def sampling_params(p):
    """TGI's rule: sample when do_sample or a warper is set; temperature must then be > 0.

    frequency_penalty is OpenAI's (count x penalty over the generated tokens), the definition TGI's own
    docstring cites; TGI's kernel divides the count by the sequence length instead (docs/serving.md)."""
    if p.temperature is not None and p.temperature <= 0:
        raise field_error("temperature", f"temperature must be strictly positive, got {p.temperature} (for "
                                         f"greedy decoding leave do_sample false and temperature unset)")
    if p.top_p is not None and not 0 < p.top_p < 1:
        raise field_error("top_p", f"top_p must be > 0.0 and < 1.0, got {p.top_p}")
    if p.top_k is not None and p.top_k <= 0:
        raise field_error("top_k", f"top_k must be strictly positive, got {p.top_k}")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise field_error("repetition_penalty", f"repetition_penalty must be strictly positive, got "
                                                f"{p.repetition_penalty}")
    sample = p.do_sample or (p.temperature not in (None, 1.0)) or p.top_k is not None or p.top_p is not None
    return make_params(temperature=(p.temperature or 1.0) if sample else 0.0, top_k=p.top_k or 0,
                       top_p=p.top_p or 1.0, repetition_penalty=p.repetition_penalty or 1.0,
                       frequency_penalty=p.frequency_penalty or 0.0, seed=p.seed)


def make_job(state, body):
    p = body.parameters
    for name, allowed in NOT_IMPLEMENTED.items():
        if getattr(p, name) not in allowed:
            raise field_error(name, f"parameter {name!r} is not supported by this server (leave it unset)")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= MAX_TOP_N_TOKENS:
        raise field_error("top_n_tokens", f"top_n_tokens must be between 0 and {MAX_TOP_N_TOKENS}, got "
                                          f"{p.top_n_tokens}")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise field_error("stop", f"stop has {len(p.stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed")
    max_new = DEFAULT_MAX_NEW_TOKENS if p.max_new_tokens is None else p.max_new_tokens
    if max_new <= 0:
        raise ServeError(f"max_new_tokens must be strictly positive, got {max_new}")
    tokenizer = state.model.tokenizer
    ids = tokenizer.encode(body.inputs, add_bos=True)
    if p.truncate is not None:
        if p.truncate <= 0:
            raise ServeError(f"truncate must be strictly positive, got {p.truncate}")
        ids = ids[-p.truncate:]                    # TGI keeps the end of the input
    state.check_ids(ids, "inputs")
    state.check_length(ids, max_new)
    return Job(prompt_ids=ids, max_new_tokens=max_new, params=sampling_params(p),
               stop_ids=frozenset(tokenizer.eos_ids), stop_strings=tuple(p.stop),
               prompt_logprobs=0 if p.details and p.decoder_input_details else -1,
               top_logprobs=p.top_n_tokens or -1)


def token_json(t):
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}


def top_tokens_json(state, t):
    """TGI's top_tokens for one new token: its alternatives, most likely first (None when not asked)."""
    if t.top is None:
        return None
    tokenizer = state.model.tokenizer
    return [{"id": i, "text": token_text(tokenizer, i), "logprob": lp, "special": is_special(tokenizer, i)}
            for i, lp in t.top]


def is_special(tokenizer, i):
    """<s>, </s> and added tokens marked special (TGI's "special" flag)."""
    if i in tokenizer.added_by_id:
        return bool(tokenizer.added_by_id[i].special)
    return 0 <= i < tokenizer.n_sp and tokenizer.sp.is_control(i)


def prefill_json(state, job, prompt):
    """TGI's details.prefill: the prompt's tokens with their logprobs (the first has none)."""
    if prompt is None:
        return []
    pieces = token_pieces(state.model.tokenizer, job.prompt_ids)
    return [{"id": i, "text": text, "logprob": lp} for i, text, lp in zip(job.prompt_ids, pieces, prompt.logprobs)]


def full_text(body, text):
    return body.inputs + text if body.parameters.return_full_text else text


async def generate_answer(state, body, request):
    scheduler = state.ready()
    job = make_job(state, body)
    events = Events([job])
    scheduler.submit([job])
    results = await events.collect(request)
    if results is None:
        return client_gone()
    r = results[0]
    out = {"generated_text": full_text(body, r.finished.text)}
    if body.parameters.details:
        out["details"] = {"finish_reason": FINISH[r.finished.finish_reason],
                          "generated_tokens": len(r.finished.token_ids), "seed": r.finished.seed,
                          "prefill": prefill_json(state, job, r.prompt),
                          "tokens": [token_json(t) for t in r.tokens]}
        if body.parameters.top_n_tokens:
            out["details"]["top_tokens"] = [top_tokens_json(state, t) for t in r.tokens]
    return out


def sse(obj):
    return f"data:{json.dumps(obj)}\n\n"


async def stream_answer(state, body, request):
    scheduler = state.ready()
    job = make_job(state, body)
    events = Events([job])
    scheduler.submit([job])

    async def lines():
        index, last = 0, None
        try:
            async for _, event in events.stream(request):
                if isinstance(event, PromptDone):
                    continue
                if isinstance(event, Token):
                    if last is not None:
                        yield sse({"index": index, "token": token_json(last),
                                   "top_tokens": top_tokens_json(state, last), "generated_text": None,
                                   "details": None})
                        index += 1
                    last = event                      # held one event back: the last one carries the text
                elif isinstance(event, Finished):
                    details = {"finish_reason": FINISH[event.finish_reason],
                               "generated_tokens": len(event.token_ids), "seed": event.seed}
                    yield sse({"index": index, "token": token_json(last), "top_tokens": top_tokens_json(state, last),
                               "generated_text": full_text(body, event.text),
                               "details": details if body.parameters.details else None})
        except ServeError as e:                      # the stream has begun: the error is its last event
            yield sse({"error": str(e), "error_type": e.kind})

    return StreamingResponse(lines(), media_type="text/event-stream")


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    if body.stream:
        raise field_error("stream", "stream is for POST /; for a stream, POST to /generate_stream")
    return await generate_answer(state_of(request), body, request)



@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request):
    if body.stream is False:
        raise field_error("stream", "stream is for POST /; /generate_stream always streams (POST /generate "
                                    "does not)")
    return await stream_answer(state_of(request), body, request)


@router.post("/")
async def compat_generate(body: GenerateRequest, request: Request):
    state = state_of(request)
    if body.stream:
        return await stream_answer(state, body, request)
    out = await generate_answer(state, body, request)
    return out if isinstance(out, Response) else JSONResponse([out])


@router.get("/info")
async def info(request: Request):
    state = state_of(request)
    o = state.options
    ctx = state.max_context if state.scheduler is not None else None
    qc = getattr(state.model, "quant_config", None) if state.model is not None else None
    dtype = None if state.model is None else f"gptq-{qc.bits}bit" if qc else str(state.model.embed_dtype)
    return {"model_id": state.name, "model_sha": None, "model_dtype": dtype, "model_device_type": "cpu",
            "model_pipeline_tag": "text-generation", "max_concurrent_requests": o.max_batch + o.max_queue,
            "max_best_of": 1, "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_tokens": None if ctx is None else ctx - 1, "max_total_tokens": ctx,
            "waiting_served_ratio": None, "max_batch_total_tokens": None if ctx is None else ctx * o.max_batch,
            "max_waiting_tokens": None, "max_batch_size": o.max_batch, "validation_workers": 1,
            "max_client_batch_size": 1, "router": "tinyllama-ref", "version": __version__, "sha": None,
            "docker_label": None}


def state_of(request):
    return request.app.state.server
