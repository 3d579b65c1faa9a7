"""Packing scoring work into ragged batches, so that one pass over the weights serves many items.

A batch is limited twice:
    rows       the token rows its passes compute: at most `batch_tokens` (compute and activations)
    positions  its KV cache, slots x longest sequence: at most KV_FACTOR x batch_tokens (memory)
The cache is rectangular (kvcache.py), so a batch of similar lengths wastes least: `pack_longest_first`
sorts by length first (the lm-evaluation-harness backend, whose answers go back in request order anyway);
`pack_in_order` keeps the input order (the `score` command's -o file is written in input order, batch after
batch, and a resumed run must rebuild exactly the same batches).
A group larger than the limits on its own still gets a batch of its own.
"""

from ..kvcache import KVCache
from ..memory import human

KV_FACTOR = 4           # cache positions per computed row a batch may hold: 1,040 / 290 for a MedQA item
MAX_DEFAULT = 4096      # rows: past this, a bigger batch saves little and delays the first written results
MIN_DEFAULT = 256


def _fits(groups, batch, g, batch_tokens):
    members = batch + [g]
    rows = sum(groups[i].rows() for i in members)
    slots = sum(len(groups[i].continuations) for i in members)
    longest = max(groups[i].longest() for i in members)
    return rows <= batch_tokens and slots * longest <= KV_FACTOR * batch_tokens


def pack_in_order(groups, batch_tokens):
    """Consecutive runs of groups that fit the limits: [[0, 1, 2], [3, 4], ...]."""
    batches, batch = [], []
    for g in range(len(groups)):
        if batch and not _fits(groups, batch, g, batch_tokens):
            batches.append(batch)
            batch = []
        batch.append(g)
    return batches + ([batch] if batch else [])


def pack_longest_first(groups, batch_tokens):
    """Groups sorted by their longest sequence (longest first, ties in input order), then packed in turn."""
    order = sorted(range(len(groups)), key=lambda g: -groups[g].longest())
    return [[order[i] for i in batch] for batch in pack_in_order([groups[g] for g in order], batch_tokens)]


def bytes_per_row(cfg):
    """Memory one batch row costs: its share of the KV cache (KV_FACTOR positions) and of the activations."""
    kv = KV_FACTOR * KVCache.bytes_needed(cfg.n_layers, 1, 1, cfg.n_kv_heads, cfg.head_dim)
    activations = 4 * (8 * cfg.dim + 4 * cfg.hidden_dim + 2 * cfg.vocab_size)   # logits of every row
    return kv + activations


def default_batch_tokens(model):
    """From the memory plan: the rows whose cache and activations fit in the budget not already spoken for.

    When every layer is resident, that is what the layers leave free; when layers stream, a quarter of the
    budget (the cache then pushes a few more layers out to disk, which many items per pass repay).
    """
    layers = model.layers
    fixed = getattr(layers, "_fixed", None)            # baseline, head and reservations (streaming.py)
    free = layers.budget - (fixed() if fixed else 0) - layers.resident_bytes()
    if layers.n_resident < layers.n_layers:
        free = max(free - 2 * max(layers.file_bytes), layers.budget // 4)
    rows = int(0.8 * free) // bytes_per_row(model.cfg)
    return max(MIN_DEFAULT, min(MAX_DEFAULT, rows))


def describe(model, batch_tokens):
    """One line for a person: the batch size and the KV cache it may take."""
    c = model.cfg
    kv = KV_FACTOR * batch_tokens * KVCache.bytes_needed(c.n_layers, 1, 1, c.n_kv_heads, c.head_dim)
    return f"batches of up to {batch_tokens} token rows (KV cache up to {human(kv)})"
