"""OpenAI's request bodies, field by field: what each route accepts, which known fields are refused unless
off, and the SamplingParams a request asks for.

As OpenAI does, an unknown field is a 400 invalid_request_error naming it (the models forbid extras); a known
field this server does not implement is refused unless it is at its off value (fields.refuse_unsupported).
Besides OpenAI's fields, top_k, min_p and repetition_penalty are accepted, as vLLM and TGI accept them.
docs/serving.md's table lists them all.
"""

from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict

from .fields import field_error, logit_bias_pairs, make_params

DEFAULT_MAX_TOKENS = 16               # the legacy completions API's default


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling fields both routes share (OpenAI's, then the extensions vLLM and TGI accept)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = None
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = DEFAULT_MAX_TOKENS
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: Union[str, List[dict], None] = None
    name: Optional[str] = None


class ChatRequest(SamplingFields):
    messages: List[Message]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    # Known to OpenAI (or TGI: tool_prompt) and not implemented here: refused unless off (CHAT_OFF).
    response_format: Optional[Dict[str, Any]] = None
    tools: Optional[list] = None
    tool_choice: Any = None
    tool_prompt: Optional[str] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list] = None
    function_call: Any = None
    audio: Any = None
    modalities: Optional[List[str]] = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: Optional[bool] = None
    metadata: Any = None
    service_tier: Any = None


# Fields known to the API but not implemented: the values that mean "off", which are accepted.
COMMON_OFF = {"user": (None,)}
COMPLETION_OFF = {**COMMON_OFF, "best_of": (None, 1), "suffix": (None, "")}
CHAT_OFF = {**COMMON_OFF, "response_format": (None, {"type": "text"}), "tools": (None, []),
            "tool_choice": (None, "none", "auto"), "tool_prompt": (None, ""), "parallel_tool_calls": (None,),
            "functions": (None, []), "function_call": (None, "none", "auto"), "audio": (None,),
            "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
            "web_search_options": (None,), "store": (None, False), "metadata": (None, {}),
            "service_tier": (None, "auto", "default")}


def sampling(state, body):
    """SamplingParams from the request; temperature 0 is greedy. top_k -1 means off (vLLM's convention)."""
    return make_params(temperature=1.0 if body.temperature is None else body.temperature,
                       top_p=1.0 if body.top_p is None else body.top_p,
                       top_k=0 if body.top_k in (None, -1) else body.top_k,
                       min_p=body.min_p or 0.0,
                       repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                       presence_penalty=body.presence_penalty or 0.0,
                       frequency_penalty=body.frequency_penalty or 0.0,
                       logit_bias=logit_bias_pairs(state, body.logit_bias), seed=body.seed)


def include_usage(body):
    """stream_options.include_usage: a last chunk with the usage (only allowed with stream, as OpenAI)."""
    if body.stream_options is not None and not body.stream:
        raise field_error("stream_options", "stream_options is only allowed when stream is true")
    return body.stream_options is not None and body.stream_options.include_usage
