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
from ..eval.items import item_prompt
from ..eval.loglik import check_perplexity_args, perplexity_windows


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
    then exactly those of the whole text (see eval/loglik.perplexity_windows), and skip drops the earlier ones.
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
def generate_chunk(model, prompts, start, upto, max_new_tokens, params, stop_strings, stop_ids, batch_tokens):
    """Worker side: the Completions of prompts[start:start + len(prompts)], by eval.prompts.iter_generate.

    upto: every prompt before this chunk's end (their lengths plan the same batches, and a seeded run seeds
    each batch by its first prompt's index in the whole file, as one process does).
    """
    from ..eval.prompts import iter_generate
    return [c for outs in iter_generate(model, model.tokenizer, upto, max_new_tokens, params, stop_strings, stop_ids,
                                        batch_tokens, skip=start, make_record=lambda i, c: c) for c in outs]


def iter_generate_completions(pool, prompts, max_new_tokens, params, stop_strings, stop_ids, batch_tokens, skip=0,
                              progress=None):
    """(index, Completion) for each prompt from `skip` on, in input order: eval.prompts.iter_generate on the pool."""
    from ..eval.prompts import batch_starts
    prompts = [list(p) for p in prompts]
    starts = batch_starts(prompts, max_new_tokens, batch_tokens)
    if skip not in starts:
        raise ValueError(f"skip={skip} is not a batch boundary")
    work = _Generate(prompts, max_new_tokens, params, stop_strings, stop_ids, batch_tokens, skip)
    costs = [len(p) + max_new_tokens for p in prompts[skip:]]
    for i, c in pool.map(work, prompts[skip:], costs=costs, progress=progress,
                         boundaries=[s - skip for s in starts if s >= skip]):
        yield skip + i, c


class _Generate:
    """generate_chunk for the chunk at `start` of prompts[skip:]. It carries every prompt of the file (small
    next to a model) and hands generate_chunk those up to the chunk's end."""

    def __init__(self, prompts, max_new_tokens, params, stop_strings, stop_ids, batch_tokens, skip):
        self.prompts, self.skip = prompts, skip
        self.kw = dict(max_new_tokens=max_new_tokens, params=params, stop_strings=list(stop_strings),
                       stop_ids=set(stop_ids), batch_tokens=batch_tokens)

    def __call__(self, model, prompts, start):
        begin = self.skip + start
        return generate_chunk(model, prompts, begin, self.prompts[:begin + len(prompts)], **self.kw)


def generate(pool, prompts, max_new_tokens=16, progress=None, **sampling):
    """New token ids for each prompt, in input order (Model.generate over the pool, one batch per chunk;
    greedy gives what one process gives when it runs the same batches)."""
    work = functools.partial(generate_ids_chunk, max_new_tokens=max_new_tokens, **sampling)
    costs = [len(p) + max_new_tokens for p in prompts]
    return [r for _, r in pool.map(work, [list(p) for p in prompts], costs=costs, progress=progress)]


def generate_ids_chunk(model, prompts, start, max_new_tokens=16, **sampling):
    """Worker side: Model.generate on the chunk's prompts in one batch."""
    return model.generate([list(p) for p in prompts], max_new_tokens=max_new_tokens, **sampling)
