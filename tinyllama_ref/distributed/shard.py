"""Cutting work into contiguous pieces of about equal cost: items into chunks, layers into stages.

Pieces are contiguous ranges of the input, so merging results back is concatenation in order, and a chunk
is named by its (start, stop) alone: what a retry needs to redo exactly that work and nothing else.
"""

import numpy as np


def contiguous_split(costs, n_pieces):
    """Split range(len(costs)) into at most n_pieces contiguous, non-empty (start, stop) ranges whose cost
    sums are as even as cutting at the ideal boundaries allows.

    Piece j ends where the running total first reaches (j + 1) / n_pieces of the whole, so no piece is more
    than one item's cost away from its share. Costs of zero count as one (an empty text still costs a call).
    """
    costs = np.maximum(np.asarray(costs, dtype=np.float64), 1.0)        # [n]
    n = len(costs)
    n_pieces = max(1, min(int(n_pieces), n))
    if n == 0:
        return []
    cum = np.cumsum(costs)                                               # [n] running total after item i
    targets = cum[-1] * np.arange(1, n_pieces) / n_pieces                # [n_pieces - 1] ideal boundaries
    cuts = []
    for t in targets:
        i = int(np.searchsorted(cum, t))                                 # first item whose total reaches t
        before = cum[i - 1] if i else 0.0                                # the total just before item i
        stop = i + 1 if cum[i] - t <= t - before else i                  # cut on the nearer side of item i
        low = cuts[-1] + 1 if cuts else 1                                # every piece keeps at least one item
        high = n - (n_pieces - 1 - len(cuts))
        cuts.append(min(max(stop, low), high))
    bounds = [0] + cuts + [n]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def chunk_ranges(costs, n_workers, boundaries=None, chunks_per_worker=4):
    """Chunks of items for a pool of n_workers, as (start, stop) ranges of about equal cost.

    Several chunks per worker: a fast worker takes more of them, a dead worker loses little, the progress bar
    moves. boundaries: sorted indices a chunk may start at (default: any); chunks are then unions of the
    units between consecutive boundaries (whole batches of a single-process run).
    """
    n = len(costs)
    cuts = sorted(set(range(n + 1) if boundaries is None else [int(b) for b in boundaries if 0 <= b <= n]) | {0, n})
    unit_costs = [sum(costs[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]              # [units]
    pieces = contiguous_split(unit_costs, max(1, n_workers) * max(1, chunks_per_worker))
    return [(cuts[a], cuts[b]) for a, b in pieces]
