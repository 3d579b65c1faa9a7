"""The units of work of an evaluation: items in, result records out, a batch at a time.

    score:      multiple-choice items -> one record per item (the options' log-likelihoods, the choices);
                score() adds the accuracies (the Python API's model.score)
    perplexity: a token sequence      -> one record per window (its negative log-likelihood)

Each turns its input into Groups (prefix.py), packs them into batches (batching.py) and yields each batch's
records as soon as the batch is done, so a caller can write them down (results.py) before the next starts.
Nothing here knows about files: a data-parallel worker can call `score_items` on its share of the items and
the records merge back by their "item" number.
"""

import time

from ..errors import GenerationError
from .batching import default_batch_tokens, pack_in_order
from .items import item_prompt, item_requests
from .loglik import accuracy_summary, check_perplexity_args, item_result, perplexity_summary, perplexity_windows
from .prefix import Group, score_groups


def check_fits(model, groups, what):
    for i, g in enumerate(groups):
        if g.longest() > model.cfg.max_seq_len:
            raise GenerationError(f"{what} {i + 1} needs {g.longest()} tokens; the model's context is "
                                  f"{model.cfg.max_seq_len} (shorten it or use fewer demonstrations)")


def run_batches(model, groups, batches, on_batch=None):
    """Yield (batch, scores) per batch: scores[k] = [(loglik, is_greedy) per continuation] of group batch[k].

    on_batch(done_groups, total_groups, tokens_per_second) after each batch (a progress bar).
    """
    done, rows, t0 = 0, 0, time.perf_counter()
    total = sum(len(b) for b in batches)
    for batch in batches:
        scores = score_groups(model, [groups[g] for g in batch])
        done += len(batch)
        rows += sum(groups[g].rows() for g in batch)
        if on_batch:
            on_batch(done, total, rows / max(time.perf_counter() - t0, 1e-9))
        yield batch, scores


# -- multiple choice -----------------------------------------------------------------------------------------
def item_groups(tokenizer, items, prompts=None, shared_prefix=True):
    """One Group per item (context = its prompt, continuations = its options); without shared_prefix, one
    Group per option (the same sequences, each run whole: for comparisons)."""
    prompts = prompts or [item_prompt(it) for it in items]
    groups = []
    for n, (item, prompt) in enumerate(zip(items, prompts), 1):
        try:
            ctx, conts = item_requests(tokenizer, item, prompt)
        except GenerationError as e:
            raise GenerationError(f"item {n}: {e}") from None
        groups.append(Group(ctx, conts))
    if shared_prefix:
        return groups, [[i] for i in range(len(groups))]
    split = [Group(g.context, [c]) for g in groups for c in g.continuations]
    owners, k = [], 0
    for g in groups:
        owners.append(list(range(k, k + len(g.continuations))))
        k += len(g.continuations)
    return split, owners


def plan_items(model, tokenizer, items, batch_tokens=None, prompts=None, shared_prefix=True):
    """(groups, owners, batches of item indices): consecutive items per batch, so records come out in order."""
    groups, owners = item_groups(tokenizer, items, prompts, shared_prefix)
    costs = [_ItemCost([groups[g] for g in own]) for own in owners]
    check_fits(model, costs, "item")
    batches = pack_in_order(costs, batch_tokens or default_batch_tokens(model))
    return groups, owners, batches


class _ItemCost:
    """An item seen by the packer: the rows, slots and longest sequence of all its groups together."""

    def __init__(self, groups):
        self.groups = groups
        self.continuations = [c for g in groups for c in g.continuations]

    def rows(self):
        return sum(g.rows() for g in self.groups)

    def longest(self):
        return max(g.longest() for g in self.groups)


def iter_score(model, tokenizer, items, batch_tokens=None, prompts=None, shared_prefix=True, skip=0,
               first_number=1, on_batch=None):
    """Yield the records of each batch of items, in input order, starting after the first `skip` items.

    `skip` must fall on a batch boundary (see batch_starts); records are numbered from first_number.
    """
    groups, owners, batches = plan_items(model, tokenizer, items, batch_tokens, prompts, shared_prefix)
    todo = [b for b in batches if b[0] >= skip]
    if todo and todo[0][0] != skip:
        raise ValueError(f"skip={skip} is not a batch boundary")
    group_batches = [[g for i in b for g in owners[i]] for b in todo]
    rows, t0 = 0, time.perf_counter()
    for b, (gbatch, scores) in zip(todo, run_batches(model, groups, group_batches)):
        by_group = dict(zip(gbatch, scores))
        records = []
        for i in b:
            option_scores = [s for g in owners[i] for s in by_group[g]]
            n_tokens = [len(c) for g in owners[i] for c in groups[g].continuations]
            records.append({"item": first_number + i, **item_result(items[i], option_scores, n_tokens)})
        rows += sum(groups[g].rows() for g in gbatch)
        if on_batch:
            on_batch(b[-1] + 1, len(items), rows / max(time.perf_counter() - t0, 1e-9))
        yield records


def batch_starts(model, tokenizer, items, batch_tokens, prompts=None, shared_prefix=True):
    """The item index each batch starts at (and len(items)): where a resumed run may continue."""
    _, _, batches = plan_items(model, tokenizer, items, batch_tokens, prompts, shared_prefix)
    return [b[0] for b in batches] + [len(items)]


def score_items(model, tokenizer, items, batch_tokens=None, prompts=None, shared_prefix=True, first_number=1,
                on_batch=None):
    """Records of all items (the unit of work: a list of items in, a list of records out)."""
    return [r for records in iter_score(model, tokenizer, items, batch_tokens, prompts, shared_prefix,
                                        first_number=first_number, on_batch=on_batch) for r in records]


def score(model, tokenizer, items, on_item=None, batch_tokens=None):
    """Score items with shared prefixes and packed batches: {"results": per-item records, the accuracies}."""
    records = score_items(model, tokenizer, items, batch_tokens=batch_tokens,
                          on_batch=(lambda done, total, _: on_item(done, total)) if on_item else None)
    return {"results": records, **accuracy_summary(records)}


# -- perplexity ----------------------------------------------------------------------------------------------
def window_groups(ids, context, stride):
    """One Group per window: the tokens before the first scored one are its context."""
    windows = perplexity_windows(len(ids), context, stride)
    return windows, [Group(list(ids[b:f]), [list(ids[f:e])]) for b, f, e in windows]


def iter_perplexity(model, ids, context=None, stride=None, batch_tokens=None, skip=0, on_batch=None):
    """Yield the records of each batch of windows: {"window", "begin", "end", "n_scored", "nll"}."""
    ids = [int(i) for i in model.check_ids(ids)]
    context, stride = check_perplexity_args(model, len(ids), context, stride)
    windows, groups = window_groups(ids, context, stride)
    batches = pack_in_order(groups, batch_tokens or default_batch_tokens(model))
    todo = [b for b in batches if b[0] >= skip]
    if todo and todo[0][0] != skip:
        raise ValueError(f"skip={skip} is not a batch boundary")
    for batch, scores in run_batches(model, groups, todo, on_batch):
        yield [{"window": w + 1, "begin": windows[w][0], "end": windows[w][2],
                "n_scored": windows[w][2] - windows[w][1], "nll": -s[0][0]} for w, s in zip(batch, scores)]


def perplexity_batch_starts(model, ids, context, stride, batch_tokens):
    context, stride = check_perplexity_args(model, len(ids), context, stride)
    _, groups = window_groups(ids, context, stride)
    return [b[0] for b in pack_in_order(groups, batch_tokens)] + [len(groups)]


def perplexity_from_records(records, n_tokens):
    return perplexity_summary(sum(r["nll"] for r in records), sum(r["n_scored"] for r in records), n_tokens)
