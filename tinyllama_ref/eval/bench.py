"""Benchmark of multiple-choice scoring: items/s one sequence at a time, with shared prefixes, packed, both.

    tinyllama-ref bench eval CHECKPOINT [--items 200] [--max-memory 20GB] [--batch-tokens N] [--json]

Items are MedQA-shaped random token ids (no tokenizer needed): a 250-token question after BOS and four
options of 8 to 20 tokens. The modes:

    one-at-a-time   every option's whole sequence in its own pass          (the old `score`: 4 passes/item)
    shared-prefix   one item per batch: its question once, options forked  (2 passes/item)
    packed          options as whole sequences, many per batch             (1 pass per batch)
    both            items with forked options, many per batch              (2 passes per batch)

The slow modes run on --slow-items items (their items/s does not depend on how many); the printed table
gives items/s, token rows computed per item and passes over the weights per item.
"""

import argparse
import json
import time

import numpy as np

from .batching import default_batch_tokens, pack_longest_first
from .prefix import Group, score_groups
from .runner import run_batches

MODES = ("one-at-a-time", "shared-prefix", "packed", "both")


def medqa_shaped(n_items, vocab_size, seed=0, question=250, option_lengths=(8, 20), n_options=4, bos=1):
    """Random items as Groups: [BOS] + question-1 ids, then n_options continuations."""
    rng = np.random.default_rng(seed)
    low = min(3, vocab_size - 1)
    return [Group([bos] + rng.integers(low, vocab_size, question - 1).tolist(),
                  [rng.integers(low, vocab_size, int(rng.integers(option_lengths[0], option_lengths[1] + 1))).tolist()
                   for _ in range(n_options)]) for _ in range(n_items)]


def run_mode(model, items, mode, batch_tokens):
    """(seconds, token rows, passes) to score every option of every item in this mode."""
    if mode in ("one-at-a-time", "packed"):
        groups = [Group(g.context, [c]) for g in items for c in g.continuations]
    else:
        groups = items
    if mode in ("one-at-a-time", "shared-prefix"):
        batches = [[g] for g in range(len(groups))]
    else:
        batches = pack_longest_first(groups, batch_tokens)
    t = time.perf_counter()
    for _ in run_batches(model, groups, batches):
        pass
    seconds = time.perf_counter() - t
    rows = sum(g.rows() for g in groups)
    passes = sum(2 if any(groups[g].shared for g in b) else 1 for b in batches)
    return seconds, rows, passes


def main(argv=None):
    p = argparse.ArgumentParser(prog="tinyllama-ref bench eval", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--slow-items", type=int, default=20, help="Items for one-at-a-time and shared-prefix.")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch-tokens", type=int, default=None, help="Default: from the memory budget.")
    p.add_argument("--max-memory", default=None)
    p.add_argument("--backend", default="numba", choices=["numba", "numpy"])
    p.add_argument("--gptq-mode", default="exact", choices=["exact", "int8"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import tinyllama_ref
    model = tinyllama_ref.load(args.checkpoint, backend=args.backend, max_memory=args.max_memory,
                               gptq_mode=args.gptq_mode)
    batch_tokens = args.batch_tokens or default_batch_tokens(model)
    items = medqa_shaped(args.items, model.cfg.vocab_size)
    score_groups(model, [Group(items[0].context[:8], items[0].continuations[:1])])     # compile, warm up
    rows = []
    for mode in args.modes.split(","):
        n = args.slow_items if mode in ("one-at-a-time", "shared-prefix") else args.items
        seconds, computed, passes = run_mode(model, items[:n], mode, batch_tokens)
        rows.append({"mode": mode, "items": n, "seconds": round(seconds, 3), "items_per_s": round(n / seconds, 4),
                     "rows_per_item": round(computed / n, 1), "passes_per_item": round(passes / n, 3),
                     "batch_tokens": batch_tokens,
                     "resident_layers": f"{model.layers.n_resident}/{model.layers.n_layers}"})
    if args.json:
        print(json.dumps(rows))
        return
    print("| mode | items | s | items/s | token rows/item | passes/item |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['items']} | {r['seconds']} | {r['items_per_s']} | {r['rows_per_item']} | "
              f"{r['passes_per_item']} |")
    print(f"batch_tokens {batch_tokens}, {rows[0]['resident_layers']} layers resident")


if __name__ == "__main__":
    main()
