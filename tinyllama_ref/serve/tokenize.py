"""POST /tokenize and /detokenize, in TGI's shape and in llama.cpp's llama-server shape.

    TGI           POST /tokenize {"inputs", "add_special_tokens"?}  -> [{"id", "text", "start", "stop"}, ...]
    llama-server  POST /tokenize {"content", "add_special"?, "with_pieces"?}  -> {"tokens": [id, ...]}
                  POST /detokenize {"tokens": [id, ...]}  -> {"content": "..."}

Both APIs use the same path, so the body's keys say which one was meant: "inputs" is TGI's, "content" is
llama-server's, and a body with neither (or both) is refused. TGI's /tokenize reads a whole GenerateRequest,
whose "parameters" change nothing there: we refuse them as an unknown field. Defaults follow each server: TGI adds the BOS
token (its /tokenize always does; add_special_tokens is our addition), llama-server does not unless asked.

TGI's start and stop are byte offsets into the input (router/src/server.rs encoding_to_tokens); the BOS
token covers no text (0, 0). Ours come from decoding the ids one at a time: each token's text is found at
the running offset of the input. A token whose text is not there (a piece of a multi-byte character, or text
the tokenizer normalised) covers no bytes, at the offset where it stands.
"""

from typing import List

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError

from .fields import field_error
from .server import token_pieces

router = APIRouter()


class TgiTokenize(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    inputs: str
    add_special_tokens: bool = True


class LlamaTokenize(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    content: str
    add_special: bool = False
    with_pieces: bool = False


class Detokenize(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tokens: List[int]


def tgi_tokens(tokenizer, text, ids):
    """[{id, text, start, stop}] with byte offsets into text."""
    data = text.encode("utf-8")
    out, at = [], 0
    for i, piece in zip(ids, token_pieces(tokenizer, ids)):
        raw = piece.encode("utf-8")
        start = data.find(raw, at) if raw else -1
        if start < 0 or data[at:start].strip():           # not found, or found past text of its own
            start = stop = at
        else:
            stop = start + len(raw)
        out.append({"id": i, "text": data[start:stop].decode("utf-8", errors="replace"), "start": start,
                    "stop": stop})
        at = stop
    return out


def body_kind(body):
    if not isinstance(body, dict) or ("inputs" in body) == ("content" in body):
        got = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise field_error("inputs", f'POST /tokenize takes TGI\'s {{"inputs": text}} or llama-server\'s '
                                    f'{{"content": text}}: give exactly one of the two (got {got})')
    return "tgi" if "inputs" in body else "llama"


def parse(model, body):
    """The body as model, or the 422 FastAPI gives a declared body (one handler words both)."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


@router.post("/tokenize")
async def tokenize(request: Request):
    state = request.app.state.server
    state.ready()
    try:
        body = await request.json()
    except ValueError as e:
        raise field_error("inputs", f"the body is not valid JSON ({e})") from None
    tokenizer = state.model.tokenizer
    if body_kind(body) == "tgi":
        req = parse(TgiTokenize, body)
        ids = tokenizer.encode(req.inputs, add_bos=req.add_special_tokens)
        return tgi_tokens(tokenizer, req.inputs, ids)
    req = parse(LlamaTokenize, body)
    ids = tokenizer.encode(req.content, add_bos=req.add_special)
    if req.with_pieces:
        return {"tokens": [{"id": i, "piece": p} for i, p in zip(ids, token_pieces(tokenizer, ids))]}
    return {"tokens": ids}


@router.post("/detokenize")
async def detokenize(body: Detokenize, request: Request):
    state = request.app.state.server
    state.ready()
    if body.tokens:                          # an empty list is the empty text
        state.check_ids(body.tokens, "tokens")
    return {"content": state.model.tokenizer.decode(body.tokens)}
