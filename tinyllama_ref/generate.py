"""The generation loop: prefill every prompt in one pass, then decode one token per sequence per pass.

All live sequences of a batch share each pass over the weights (when weights stream from disk this is what
multiplies throughput); a sequence that stops leaves the batch. A sequence stops on an end-of-sequence token,
on a stop string, after max_new_tokens, or when it reaches the context limit.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import GenerationError
from .sampling import Sampler, SamplingParams
from .templates import StopStrings


@dataclass
class Completion:
    """What one prompt produced, with the reason it stopped and the timings of its run."""
    prompt_ids: list
    token_ids: list = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"          # "eos", "stop", "length" or "context"
    prefill_seconds: float = 0.0
    token_seconds: list = field(default_factory=list)


def check_prompts(model, prompts):
    cfg = model.cfg
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError("empty prompt: give at least one token or some text")
        if len(p) >= cfg.max_seq_len:
            raise GenerationError(f"prompt{'' if len(prompts) == 1 else f' {i + 1}'} has {len(p)} tokens; the "
                                  f"model's context is {cfg.max_seq_len}, leaving no room to generate")
        model.check_ids(p)


def run(model, prompts, max_new_tokens, sampler, stop_ids, on_step=None):
    """Core loop over token ids. on_step(completions, live) may end a sequence early by returning indices.

    Returns a Completion per prompt (token ids, finish reason, timings).
    """
    cfg = model.cfg
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    check_prompts(model, prompts)
    outs = [Completion(prompt_ids=list(p)) for p in prompts]
    if max_new_tokens == 0:
        return outs
    max_len = min(cfg.max_seq_len, max(len(p) for p in prompts) + max_new_tokens)
    with model.new_cache(len(prompts), max_len) as cache:
        return _decode(model, prompts, outs, cache, max_new_tokens, max_len, sampler, stop_ids, on_step)


def _decode(model, prompts, outs, cache, max_new_tokens, max_len, sampler, stop_ids, on_step):
    cfg = model.cfg
    live = list(range(len(prompts)))
    t = time.perf_counter()
    logits = model.forward([np.asarray(p) for p in prompts], cache, live)       # [B, V]
    t_prev = time.perf_counter()
    for c in outs:
        c.prefill_seconds = t_prev - t
    while live:
        new = sampler.sample_batch(logits, [outs[s].prompt_ids + outs[s].token_ids for s in live])
        for s, tok in zip(live, new):
            c = outs[s]
            c.token_ids.append(int(tok))
            if tok in stop_ids:
                c.finish_reason = "eos"
            elif len(c.token_ids) >= max_new_tokens:
                c.finish_reason = "length"
            elif len(c.prompt_ids) + len(c.token_ids) >= max_len:
                c.finish_reason = "context" if max_len == cfg.max_seq_len else "length"
            else:
                c.finish_reason = None
        stopped = set(on_step(outs, live) or ()) if on_step else set()
        for s in stopped:
            outs[s].finish_reason = "stop"
        live = [s for s in live if outs[s].finish_reason is None]
        if not live:
            break
        logits = model.forward([np.array([outs[s].token_ids[-1]]) for s in live], cache, live)  # [B_live, V]
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now            # one decode step: sampling plus a pass over the weights
        for s in live:
            outs[s].token_seconds.append(dt)
    return outs


def generate_ids(model, prompts, max_new_tokens=16, temperature=0.0, seed=None, stop_ids=None, **sampling):
    """New token ids for each prompt (the API behind Model.generate)."""
    params = SamplingParams.from_options(temperature=temperature, seed=seed, **sampling)
    stop_ids = set(model.cfg.eos_token_ids if stop_ids is None else stop_ids)
    return [c.token_ids for c in run(model, prompts, max_new_tokens, Sampler(params), stop_ids)]


class TextStopper:
    """Turns new tokens into printable text per sequence, and ends a sequence at a stop string.

    Text that could still be the start of a stop string is held back (templates.StopStrings), so a stop
    string never reaches the output even when it arrives split over several tokens.
    """

    def __init__(self, tokenizer, n, stop_strings, on_text=None):
        self.tokenizer = tokenizer
        self.decoders = [None] * n        # made at the first token: the prompt is their left context
        self.matchers = [StopStrings(stop_strings) for _ in range(n)]
        self.seen = [0] * n
        self.text = [""] * n
        self.on_text = on_text

    def __call__(self, outs, live):
        stopped = []
        for s in live:
            c = outs[s]
            if self.decoders[s] is None:      # knowing the prompt keeps the first word's leading space
                self.decoders[s] = self.tokenizer.stream_decoder(skip_special_tokens=True,
                                                                 context_ids=c.prompt_ids)
            piece = "".join(self.decoders[s].push(t) for t in c.token_ids[self.seen[s]:])
            self.seen[s] = len(c.token_ids)
            finished = c.finish_reason is not None
            if finished:
                piece += self.decoders[s].flush()
            shown, hit = self.matchers[s].push(piece)
            if hit:
                stopped.append(s)
            elif finished:
                shown += self.matchers[s].flush()
            if shown:
                self.text[s] += shown
                if self.on_text:
                    self.on_text(s, shown)
            c.text = self.text[s]
        return stopped


def generate_text(model, tokenizer, prompts, max_new_tokens=256, params=None, stop_strings=(),
                  stop_ids=None, on_text=None):
    """Complete each prompt (a list of token ids, already templated) and decode the new text.

    on_text(index, new_text) is called as text becomes printable (for streaming to a terminal).
    """
    params = params or SamplingParams(temperature=0.0)
    stop_ids = set(tokenizer.eos_ids if stop_ids is None else stop_ids)
    stopper = TextStopper(tokenizer, len(prompts), stop_strings, on_text)
    outs = run(model, prompts, max_new_tokens, Sampler(params), stop_ids, on_step=stopper)
    for c, text in zip(outs, stopper.text):
        c.text = text
    return outs
