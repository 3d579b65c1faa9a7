"""The units of work the commands hand to a DataParallel pool, planned exactly as one process plans them.

A single-process `score` or `perplexity` packs its items into batches (eval/batching.py) and runs them in
order. Here the driver makes the same plan, cuts it into chunks of whole batches (so each batch's rows are
multiplied together just as in one process: the same bits), and each worker runs its chunk with the same
eval/runner.py code. The records come back in input order, so a caller writes them exactly as one process
does (eval/results.py), and a resumed run (skip) starts at a batch boundary as it would alone.
"""

import functools
from types import SimpleNamespace

from ..eval.runner import batch_starts, iter_perplexity, perplexity_batch_starts, plan_items, score_items
from ..evaluate import check_perplexity_args, item_prompt, perplexity_windows


def _flat(pool_records):
    for _, record in pool_records:
        yield record


# -- multiple choice ------------------------------------------------------------------------------------------
def score_chunk(model, pairs, start, batch_tokens, shared_prefix, first_number):
    """Worker side: the records of items[start:start + len(pairs)], each pair (item, prompt)."""
    items, prompts = [p[0] for p in pairs], [p[1] for p in pairs]
    return score_items(model, model.tokenizer, items, batch_tokens, prompts, shared_prefix,
                       first_number=first_number + start)


def iter_score(pool, cfg, tokenizer, items, batch_tokens, prompts=None, shared_prefix=True, skip=0,
               first_number=1, progress=None):
    """eval.runner.iter_score's records, one at a time in input order, from the pool's workers.

    cfg: the model's config (the plan checks every item fits its context); skip: items already done (a
    batch boundary, as for iter_score). progress counts scored token rows.
    """
    prompts = prompts or [item_prompt(it) for it in items]
    info = SimpleNamespace(cfg=cfg)                # all the plan needs of a model once batch_tokens is given
    groups, owners, _ = plan_items(info, tokenizer, items, batch_tokens, prompts, shared_prefix)
    starts = batch_starts(info, tokenizer, items, batch_tokens, prompts, shared_prefix)
    if skip not in starts:
        raise ValueError(f"skip={skip} is not a batch boundary")
    rows = [sum(groups[g].rows() for g in owners[i]) for i in range(skip, len(items))]
    work = functools.partial(score_chunk, batch_tokens=batch_tokens, shared_prefix=shared_prefix,
                             first_number=first_number + skip)
    pairs = list(zip(items[skip:], prompts[skip:]))
    return _flat(pool.map(work, pairs, costs=rows, progress=progress,
                          boundaries=[s - skip for s in starts if s >= skip]))


# -- perplexity -------------------------------------------------------------------------------------------
def perplexity_chunk(model, windows, start, ids, context, stride, batch_tokens):
    """Worker side: the records of windows[start:start + len(windows)] of the whole text.

    The text is cut after the chunk's last window: the windows before that point, and their batches, are
    then exactly those of the whole text (see evaluate.perplexity_windows), and skip drops the earlier ones.
    """
    end = windows[-1][2]
    return [r for records in iter_perplexity(model, ids[:end], context, stride, batch_tokens, skip=start)
            for r in records]


def iter_perplexity_records(pool, cfg, ids, context=None, stride=None, batch_tokens=None, skip=0,
                            progress=None):
    """eval.runner.iter_perplexity's window records, one at a time in order, from the pool's workers."""
    ids = [int(i) for i in ids]
    context, stride = check_perplexity_args(SimpleNamespace(cfg=cfg), len(ids), context, stride)
    windows = perplexity_windows(len(ids), context, stride)              # [(begin, first, end)]
    starts = perplexity_batch_starts(SimpleNamespace(cfg=cfg), ids, context, stride, batch_tokens)
    if skip not in starts:
        raise ValueError(f"skip={skip} is not a batch boundary")
    work = functools.partial(perplexity_chunk, ids=ids, context=context, stride=stride, batch_tokens=batch_tokens)
    todo = windows[skip:]
    records = pool.map(_Offset(work, skip), todo, costs=[e - b for b, _, e in todo], progress=progress,
                       boundaries=[s - skip for s in starts if s >= skip])
    return _flat(records)


class _Offset:
    """work(model, items, start) seen from a list that begins `offset` items into the whole input."""

    def __init__(self, work, offset):
        self.work, self.offset = work, offset

    def __call__(self, model, items, start):
        return self.work(model, items, start + self.offset)


# -- generation -------------------------------------------------------------------------------------------
def generate_chunk(model, prompts, start, max_new_tokens=16, **sampling):
    """Worker side: token ids after each prompt (a list of ids), the chunk's prompts in one batch."""
    return model.generate([list(p) for p in prompts], max_new_tokens=max_new_tokens, **sampling)


def generate(pool, prompts, max_new_tokens=16, progress=None, **sampling):
    """New token ids for each prompt, in input order (Model.generate over the pool; greedy gives what one
    process gives, sampling draws from each chunk's own generator)."""
    work = functools.partial(generate_chunk, max_new_tokens=max_new_tokens, **sampling)
    costs = [len(p) + max_new_tokens for p in prompts]
    return [r for _, r in pool.map(work, [list(p) for p in prompts], costs=costs, progress=progress)]
