"""Evaluations built on log-likelihoods: perplexity of a text, and multiple-choice scoring.

Both only ever read `model.forward` logits through log_softmax; nothing here samples.
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


def perplexity(model, ids, context=None, stride=None, on_window=None):
    """Sliding-window perplexity, as in the Hugging Face perplexity guide.

    Windows of `context` tokens start every `stride` tokens; each token is scored once, in the first window
    that reaches it, with as much left context as that window gives. stride == context: disjoint windows.
    Returns dict(perplexity, nll, n_scored, seconds, tokens_per_second).
    """
    ids = model.check_ids(ids)
    context = context or model.cfg.max_seq_len
    stride = stride or context
    if not 2 <= context <= model.cfg.max_seq_len:
        raise GenerationError(f"context must be between 2 and the model's {model.cfg.max_seq_len} tokens, "
                              f"got {context}")
    if not 1 <= stride <= context:
        raise GenerationError(f"stride must be between 1 and the context ({context}), got {stride}")
    if len(ids) < 2:
        raise GenerationError("the text must have at least 2 tokens to measure perplexity")
    t0 = time.perf_counter()
    nll, scored, prev_end, processed = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        first = max(prev_end, begin + 1)               # first position this window scores
        if end > first:
            logits = model.logits(ids[begin:end])                            # [end - begin, V]
            rows = logits[first - 1 - begin:end - 1 - begin]                 # rows predicting first..end-1
            nll -= float(token_logprobs(rows, ids[first:end]).sum())
            scored += end - first
            processed += end - begin
        prev_end = end
        if on_window:
            on_window(end, len(ids))
        if end == len(ids):
            break
    seconds = time.perf_counter() - t0
    return {"perplexity": float(np.exp(nll / scored)), "nll": nll, "n_scored": scored,
            "n_tokens": int(len(ids)), "seconds": seconds,
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


def split_continuation(tokenizer, prompt, option):
    """Token ids of prompt and of ' option' after it, tokenizing the whole text once (as lm-eval does)."""
    ctx = tokenizer.encode(prompt, add_bos=True)
    whole = tokenizer.encode(prompt + " " + option, add_bos=True)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer.encode(" " + option, add_bos=False)     # the tokenizer merged across the seam


def score_item(model, tokenizer, item):
    """Log-likelihood of each option after the prompt; all options go through the model in one pass."""
    prompt = item_prompt(item)
    pairs = [split_continuation(tokenizer, prompt, o) for o in item.options]
    seqs = [np.array(ctx + cont) for ctx, cont in pairs]
    longest = max(len(s) for s in seqs)
    if longest > model.cfg.max_seq_len:
        raise GenerationError(f"an item needs {longest} tokens; the model's context is {model.cfg.max_seq_len}")
    cache = model.new_cache(len(seqs), longest)
    logits = model.forward(seqs, cache, list(range(len(seqs))), all_logits=True)   # [sum lengths, V]
    model.layers.release_reservation("KV cache")
    sums, row = [], 0
    for (ctx, cont), seq in zip(pairs, seqs):
        rows = logits[row + len(ctx) - 1:row + len(seq) - 1]                         # predict cont tokens
        sums.append(float(token_logprobs(rows, np.array(cont)).sum()))
        row += len(seq)
    # Length normalisation by the option's UTF-8 bytes, as lm-evaluation-harness's acc_norm does.
    norm = [s / len((" " + o).encode("utf-8")) for s, o in zip(sums, item.options)]
    return {"loglik": sums, "loglik_norm": norm, "choice": int(np.argmax(sums)),
            "choice_norm": int(np.argmax(norm)), "answer": item.answer,
            "n_tokens": [len(c) for _, c in pairs]}


def score(model, tokenizer, items, on_item=None):
    results = []
    for i, item in enumerate(items):
        results.append(score_item(model, tokenizer, item))
        if on_item:
            on_item(i + 1, len(items))
    n = len(results)
    return {"results": results, "n_items": n,
            "accuracy": sum(r["choice"] == r["answer"] for r in results) / n,
            "accuracy_norm": sum(r["choice_norm"] == r["answer"] for r in results) / n}
