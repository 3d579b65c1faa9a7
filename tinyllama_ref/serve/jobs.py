"""What a route hands the scheduler (a Job) and what comes back to it (events), plus the server's errors.

A route validates a request, turns it into one Job per sequence to generate, and reads the Job's events as
the scheduler thread produces them:

    PromptDone   the prompt is in the KV cache (with its per-token logprobs when the Job asked for them)
    Token        one new token: id, printable text, logprob (and the top alternatives when asked)
    Finished     the sequence is over: finish reason and the whole text
    Failed       the sequence could not run (shutdown, an engine error): a message and a ServeError kind
"""

import itertools
import time
from dataclasses import dataclass, field

from ..errors import TinyLlamaError
from ..sampling import SamplingParams


class ServeError(TinyLlamaError):
    """A request the server refuses or cannot finish. kind picks the HTTP status and the error's type."""

    STATUS = {"validation": 422, "not_found": 404, "overloaded": 503, "unavailable": 503, "generation": 500}

    def __init__(self, message, kind="validation"):
        super().__init__(message)
        self.kind = kind

    @property
    def status(self):
        return self.STATUS[self.kind]


_ids = itertools.count(1)


@dataclass
class Job:
    """One sequence to generate. on_event(event) is called from the scheduler thread."""
    prompt_ids: list
    max_new_tokens: int
    params: SamplingParams
    stop_ids: frozenset
    stop_strings: tuple = ()
    prompt_logprobs: int = -1      # >= 0: logprob of every prompt token, plus this many top alternatives
    top_logprobs: int = -1         # >= 0: the same for every generated token (-1: only the token's logprob)
    on_event: object = None
    cancelled: bool = False        # set by the route when its client goes away; seen at the next pass
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self):
        self.cancelled = True


@dataclass
class PromptDone:
    logprobs: list = None          # [len(prompt)]: None for the first token, then log p(token | before)
    top: list = None               # [len(prompt)]: None or [(id, logprob), ...] most likely first


@dataclass
class Token:
    id: int
    text: str                      # the text this token made printable (held back near a stop string)
    logprob: float                 # log p(token) under the model's distribution (before sampling filters)
    special: bool
    top: list = None               # [(id, logprob), ...] when the Job asked for alternatives


@dataclass
class Finished:
    finish_reason: str             # "eos", "stop", "length"
    text: str
    token_ids: list
    prompt_tokens: int
    seed: int = None
    seconds: float = 0.0


@dataclass
class Failed:
    message: str
    kind: str = "generation"
