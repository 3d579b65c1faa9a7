"""Evaluations that finish: many items per pass over the weights, shared prefixes, resumable results.

    items.py     the multiple-choice item: its JSON schema, its prompt, its token requests
    loglik.py    the log-likelihood math, and one-sequence-at-a-time references (perplexity, score_item)
    prefix.py    score continuations from a fork of their context's KV-cache slot (one prefill per context)
    batching.py  pack work into ragged batches under a token budget (default from the memory plan)
    runner.py    the units of work: items in, records out, a batch at a time; score() (model.score)
    prompts.py   the same for `generate --prompts-file`
    results.py   the JSONL file written a batch at a time (fsync) and resumed after a crash
    fewshot.py   few-shot prompts for `score`
    harness.py   TinyLlamaLM, the lm-evaluation-harness backend (extra: [eval])
    bench.py     `bench eval`: items/s one sequence at a time, shared prefix, packed, both
"""
