"""Evaluations built on log-likelihoods: perplexity of a text, and multiple-choice scoring.

This is the math, and one-sequence-at-a-time reference versions of both; everything only ever reads
`model.forward` logits through log_softmax, nothing here samples. Scheduling many items into few passes over
the weights (shared prefixes, packed batches, resumable output) is tinyllama_ref/eval/'s job, and its results
are tested against these.
"""

import time
from dataclasses import dataclass

import numpy as np

from .errors import GenerationError
from .jsonl import read_jsonl
from .ops import log_softmax


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


@dataclass
class Item:
    question: str
    options: list
    answer: int          # index of the right option
    context: str = ""    # PubMedQA-style passage shown before the question


def parse_item(obj, where):
    """One multiple-choice item from JSON; `where` names it in errors (file:line)."""
    if not isinstance(obj, dict):
        raise GenerationError(f"{where}: expected a JSON object with question, options, answer")
    for key in ("question", "options", "answer"):
        if key not in obj:
            raise GenerationError(f"{where}: missing field {key!r}")
    q, options, answer = obj["question"], obj["options"], obj["answer"]
    if isinstance(options, dict):                      # MedQA ships {"A": "...", "B": "..."}
        letters = list(options)
        options = [options[k] for k in letters]
        if isinstance(answer, str) and answer in letters:
            answer = letters.index(answer)
    if not isinstance(q, str) or not isinstance(options, list) or len(options) < 2 or \
            not all(isinstance(o, str) and o for o in options):
        raise GenerationError(f"{where}: question must be text and options a list of at least 2 non-empty texts")
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise GenerationError(f"{where}: answer must be an option index or an option's text")
    if isinstance(answer, str):
        if answer in options:
            answer = options.index(answer)
        elif len(answer) == 1 and answer.isalpha() and ord(answer.upper()) - 65 < len(options):
            answer = ord(answer.upper()) - 65          # "C" -> 2
        else:
            raise GenerationError(f"{where}: answer {answer!r} is neither an option's text nor its letter")
    if not 0 <= answer < len(options):
        raise GenerationError(f"{where}: answer index {answer} is out of range for {len(options)} options")
    return Item(q, options, answer, str(obj.get("context", "") or ""))


def read_items(path):
    """A JSONL file of items; a malformed line is an error that names the line."""
    return [parse_item(obj, where) for where, obj in read_jsonl(path, "items")]


def item_prompt(item):
    """The text every option continues (the lm-evaluation-harness 'Question: ... Answer:' format)."""
    head = f"{item.context.strip()}\n" if item.context else ""
    return f"{head}Question: {item.question.strip()}\nAnswer:"


def split_continuation(tokenizer, context, continuation):
    """Token ids of a context and of the continuation after it, the way lm-evaluation-harness splits them.

    Spaces at the end of the context move to the continuation (word-boundary spaces belong to what is
    scored); the whole text is tokenized once and the continuation is what follows the context's own
    tokens, so a word that straddles the seam is tokenized as the model would see it in one piece.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:                                   # nothing to condition on but BOS
        return [tokenizer.bos_id], tokenizer.encode(continuation, add_bos=False)
    ctx = tokenizer.encode(context, add_bos=True)
    cont = tokenizer.encode(context + continuation, add_bos=True)[len(ctx):]
    if not cont:
        raise GenerationError(f"the continuation {continuation!r} adds no tokens after its context")
    return ctx, cont


def item_requests(tokenizer, item, prompt=None):
    """(context ids, [continuation ids per option]) of an item; prompt defaults to item_prompt(item)."""
    prompt = item_prompt(item) if prompt is None else prompt
    pairs = [split_continuation(tokenizer, prompt, " " + o) for o in item.options]
    return pairs[0][0], [cont for _, cont in pairs]


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


def score(model, tokenizer, items, on_item=None, batch_tokens=None):
    """Score items with shared prefixes and packed batches (tinyllama_ref.eval): per-item records and the
    accuracies."""
    from .eval.runner import score_items
    records = score_items(model, tokenizer, items, batch_tokens=batch_tokens,
                          on_batch=(lambda done, total, _: on_item(done, total)) if on_item else None)
    return {"results": records, **accuracy_summary(records)}
