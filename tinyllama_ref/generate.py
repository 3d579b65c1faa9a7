"""The generation loop: prefill every prompt in one pass, then decode one token per sequence per pass.

All live sequences of a batch share each pass over the weights; a sequence that stops (end-of-sequence
token, token budget, context limit) simply leaves the batch.
"""

import numpy as np

from .errors import GenerationError


def greedy_or_temperature(temperature, rng):
    def pick(logits, histories):                                   # logits [B, V]
        if temperature == 0.0:
            return [int(i) for i in np.argmax(logits, axis=-1)]
        z = logits / temperature
        p = np.exp(z - z.max(axis=-1, keepdims=True))              # [B, V]
        p /= p.sum(axis=-1, keepdims=True)
        return [int(rng.choice(len(row), p=row)) for row in p]
    return pick


def generate_ids(model, prompts, max_new_tokens=16, temperature=0.0, seed=None, stop_ids=None, pick=None,
                 on_tokens=None):
    """New token ids for each prompt. `pick(logits [B, V], histories) -> ids` chooses the next tokens."""
    cfg = model.cfg
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    for p in prompts:
        if len(p) == 0:
            raise GenerationError("empty prompt: give at least one token (usually BOS)")
        if len(p) > cfg.max_seq_len:
            raise GenerationError(f"prompt of {len(p)} tokens is longer than the model's context of "
                                  f"{cfg.max_seq_len}")
        model.check_ids(p)
    stop_ids = set(cfg.eos_token_ids if stop_ids is None else stop_ids)
    pick = pick or greedy_or_temperature(temperature, np.random.default_rng(seed))
    max_len = min(cfg.max_seq_len, max(len(p) for p in prompts) + max_new_tokens)
    cache = model.new_cache(len(prompts), max_len)
    outs = [[] for _ in prompts]
    if max_new_tokens == 0:
        return outs
    live = list(range(len(prompts)))
    logits = model.forward([np.asarray(p) for p in prompts], cache, live)       # [B, V]
    while live:
        new = pick(logits, [prompts[s] + outs[s] for s in live])
        still = []
        for s, tok in zip(live, new):
            outs[s].append(tok)
            full = len(prompts[s]) + len(outs[s]) >= max_len
            if tok not in stop_ids and len(outs[s]) < max_new_tokens and not full:
                still.append(s)
        if on_tokens:
            on_tokens(dict(zip(live, new)))
        if not still:
            break
        live = still
        logits = model.forward([np.array([outs[s][-1]]) for s in live], cache, live)  # [B_live, V]
    return outs
