"""The log-likelihood math of every evaluation, and one-sequence-at-a-time reference versions of both.

    perplexity:  sliding windows over a token sequence, each token scored once (perplexity_windows)
    score_item:  each option's log-likelihood after the item's prompt, and which option wins

Everything reads `model.forward` logits through log_softmax; nothing here samples. Scheduling many items into
few passes over the weights is runner.py's job (with prefix.py and batching.py), and its results are tested
against these references.
"""

import time

import numpy as np

from ..errors import GenerationError
from ..ops import log_softmax
from .items import item_requests


def token_logprobs(logits, targets):
    """log p(target_t) under each row of logits: [n, V], [n] -> [n]."""
    logp = log_softmax(logits.astype(np.float64), axis=-1)                   # [n, V]
    return logp[np.arange(len(targets)), targets]                           # [n]


def continuation_loglik(logits, continuation):
    """(sum of log p, is_greedy) of a continuation, given the logits rows that predict its tokens [n, V].

    is_greedy: every token is the row's argmax, i.e. greedy decoding would have produced exactly this
    continuation (lm-evaluation-harness's second answer).
    """
    targets = np.asarray(continuation)
    greedy = bool(np.all(np.argmax(logits, axis=-1) == targets))
    return float(token_logprobs(logits, targets).sum()), greedy


def perplexity_windows(n_tokens, context, stride):
    """[(begin, first, end)]: window ids[begin:end] scores the tokens first..end-1 (each token once)."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)               # first position this window scores
        if end > first:
            windows.append((begin, first, end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def check_perplexity_args(model, n_tokens, context, stride):
    """The context and stride to use (defaults filled in), or a GenerationError saying what is wrong."""
    for name, value in (("context", context), ("stride", stride)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise GenerationError(f"{name} must be a whole number of tokens, got {value!r}")
    context = context or model.cfg.max_seq_len
    stride = stride or context
    if not 2 <= context <= model.cfg.max_seq_len:
        raise GenerationError(f"context must be between 2 and the model's {model.cfg.max_seq_len} tokens, "
                              f"got {context}")
    if not 1 <= stride <= context:
        raise GenerationError(f"stride must be between 1 and the context ({context}), got {stride}")
    if n_tokens < 2:
        raise GenerationError("the text must have at least 2 tokens to measure perplexity")
    return context, stride


def perplexity_summary(nll, n_scored, n_tokens):
    return {"perplexity": float(np.exp(nll / n_scored)), "nll": nll, "n_scored": n_scored,
            "n_tokens": int(n_tokens)}


def perplexity(model, ids, context=None, stride=None, on_window=None):
    """Sliding-window perplexity, as in the Hugging Face perplexity guide (one window per pass: the reference).

    Windows of `context` tokens start every `stride` tokens; each token is scored once, in the first window
    that reaches it, with as much left context as that window gives. stride == context: disjoint windows.
    Returns dict(perplexity, nll, n_scored, n_tokens, seconds, tokens_per_second).
    """
    ids = model.check_ids(ids)
    context, stride = check_perplexity_args(model, len(ids), context, stride)
    t0 = time.perf_counter()
    nll, scored, processed = 0.0, 0, 0
    for begin, first, end in perplexity_windows(len(ids), context, stride):
        logits = model.logits(ids[begin:end])                                # [end - begin, V]
        rows = logits[first - 1 - begin:end - 1 - begin]                     # rows predicting first..end-1
        nll -= float(token_logprobs(rows, ids[first:end]).sum())
        scored += end - first
        processed += end - begin
        if on_window:
            on_window(end, len(ids))
    seconds = time.perf_counter() - t0
    return {**perplexity_summary(nll, scored, len(ids)), "seconds": seconds,
            "tokens_per_second": processed / seconds if seconds > 0 else float("inf")}


def item_result(item, scores, n_tokens):
    """The record of one item from its options' (loglik, is_greedy): results only, no timings."""
    sums = [s for s, _ in scores]
    # Length normalisation as lm-evaluation-harness's acc_norm (api/task.py): by the option's characters,
    # without the space that separates it from the prompt.
    norm = [s / len(o) for s, o in zip(sums, item.options)]
    return {"loglik": sums, "loglik_norm": norm, "is_greedy": [g for _, g in scores],
            "choice": int(np.argmax(sums)), "choice_norm": int(np.argmax(norm)), "answer": item.answer,
            "n_tokens": list(n_tokens)}


def accuracy_summary(records):
    n = len(records)
    return {"n_items": n,
            "accuracy": sum(r["choice"] == r["answer"] for r in records) / n if n else 0.0,
            "accuracy_norm": sum(r["choice_norm"] == r["answer"] for r in records) / n if n else 0.0}


def score_item(model, tokenizer, item, prompt=None):
    """Log-likelihood of each option after the prompt, each option's whole sequence on its own (reference)."""
    ctx, conts = item_requests(tokenizer, item, prompt)
    scores = []
    for cont in conts:
        seq = list(ctx) + list(cont)
        if len(seq) - 1 > model.cfg.max_seq_len:
            raise GenerationError(f"an item needs {len(seq) - 1} tokens; the model's context is "
                                  f"{model.cfg.max_seq_len}")
        logits = model.logits(seq[:-1])                                       # [len - 1, V]
        scores.append(continuation_loglik(logits[len(ctx) - 1:], cont))       # rows predicting cont
    return item_result(item, scores, [len(c) for c in conts])
