"""`generate --prompts-file` as batches: consecutive prompts share each decode pass, a batch at a time.

Each batch is generate.py's loop over a few prompts (one prefill pass, then one pass per new token for all
of them); its records are yielded when it finishes so the caller can write them down (results.py) and a
killed run resumes at the next batch. A seeded run gives every batch its own seed (seed + the batch's first
prompt index), so a resumed run draws the same tokens as an uninterrupted one.
"""

from dataclasses import replace

from .batching import pack_in_order


class _PromptCost:
    """A prompt seen by the packer: its prefill rows, and one cache slot as long as prompt + new tokens."""

    def __init__(self, n_prompt, max_new_tokens):
        self.n_prompt, self.max_new = n_prompt, max_new_tokens
        self.continuations = [None]

    def rows(self):
        return self.n_prompt

    def longest(self):
        return self.n_prompt + self.max_new


def plan_prompts(prompts, max_new_tokens, batch_tokens):
    """Batches of consecutive prompt indices (prompts: token id lists)."""
    return pack_in_order([_PromptCost(len(p), max_new_tokens) for p in prompts], batch_tokens)


def iter_generate(model, tokenizer, prompts, max_new_tokens, params, stop_strings, stop_ids, batch_tokens,
                  skip=0, make_record=None):
    """Yield, per batch of prompts (after the first `skip`), the list of make_record(index, Completion)."""
    from ..generate import generate_text
    for batch in plan_prompts(prompts, max_new_tokens, batch_tokens):
        if batch[0] < skip:
            continue
        p = params if params.seed is None else replace(params, seed=params.seed + batch[0])
        outs = generate_text(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, p, stop_strings,
                             stop_ids=stop_ids)
        yield [make_record(i, c) for i, c in zip(batch, outs)]


def batch_starts(prompts, max_new_tokens, batch_tokens):
    return [b[0] for b in plan_prompts(prompts, max_new_tokens, batch_tokens)] + [len(prompts)]
