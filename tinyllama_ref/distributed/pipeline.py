"""A model split into K pipeline stages on Ray actors, presenting the interface the engine's callers use.

    model = tinyllama_ref.TextModel(PipelineModel("ckpt", stages=2, address="auto"))
    model.logits([1, 306, 4658]); model.generate(...); generate.run(model, ...); eval.runner.score(model, ...)

The driver holds no weights: config, the vocabulary size and the layers' sizes come from the checkpoint's
headers. forward() sends token ids to the first stage and each stage's activations [N, D] float32 straight
to the next one as a Ray object reference (they never come back through the driver); only the logits do.

Micro-batches keep the stages busy: a pass over B sequences is cut into up to K groups of whole sequences,
and group j+1 enters stage 0 while group j is in stage 1 (an actor runs its calls in the order they were
submitted). A group's rows are then multiplied together, so a batch's logits are those of one process
running the same groups one after another; a single sequence, or micro_batches=1, is bit-identical to one
process running the whole batch.
"""

import itertools
import os

import numpy as np

from ..checkpoint import Checkpoint
from ..config import load_config, with_vocab
from ..model import Model, place_sequences
from ..streaming import Reservation
from ..weights import embedding_info, layer_tensor_names
from .cluster import DistributedError, check_fits, connect, remote_error, stop_actors
from .shard import contiguous_split
from .stage import start_stage

_cache_ids = itertools.count()


class PipelineCache:
    """The driver's handle on one KV cache spread over the stages: lengths per slot live here, the keys and
    values on the stages (each for its own layers). Close it, or use it in a `with` block."""

    def __init__(self, model, cid, n_slots, max_len):
        self.model, self.cid = model, cid
        self.lengths = np.zeros(n_slots, dtype=np.int64)
        self.max_len = max_len

    def copy_slot(self, src, dst, length=None):
        """kvcache.KVCache.copy_slot on every stage (ordered before any later pass: same caller, same actor)."""
        n = int(self.lengths[src]) if length is None else int(length)
        if not 0 <= n <= int(self.lengths[src]):
            raise ValueError(f"slot {src} holds {int(self.lengths[src])} positions, cannot copy {n}")
        for s in self.model.stages:
            s.copy_slot.remote(self.cid, src, dst, n)
        self.lengths[dst] = n

    def close(self):
        if self.model is not None:
            for s in self.model.stages:
                s.close_cache.remote(self.cid)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class PipelineLayers:
    """What callers ask of model.layers. Each stage checks its own budget when it loads and when a cache is
    opened, so reservations made here only record the request."""

    def __init__(self, cfg, ranges, hosts, file_bytes):
        self.n_layers = self.n_resident = cfg.n_layers
        self.ranges, self.hosts, self.file_bytes = ranges, hosts, file_bytes
        self.reserved = {}

    def reserve(self, what, nbytes):
        self.reserved[what] = nbytes
        return Reservation(self, what)

    def release_reservation(self, what):
        self.reserved.pop(what, None)

    def streamed_bytes_per_pass(self):
        return 0

    def resident_bytes(self):
        return sum(self.file_bytes)

    def describe(self):
        parts = [f"layers {a}-{b - 1} on {host}" for (a, b), host in zip(self.ranges, self.hosts)]
        return f"pipeline of {len(self.ranges)} stages: " + ", ".join(parts)


class PipelineModel:
    """The checkpoint at `path` split into `stages` contiguous ranges of layers of about equal bytes.

    Every node reads the checkpoint at the same path and uses its own max_memory. address: as for
    cluster.connect. cpus_per_stage: cores Ray reserves per stage; threads: its BLAS/OpenMP threads (default
    cpus_per_stage, see workers.actor_options). micro_batches: groups a pass is cut into (default: one per
    stage).
    """

    # The pieces that only use cfg, new_cache and forward are the single-process model's own code.
    check_ids = Model.check_ids
    logits = Model.logits
    generate = Model.generate
    workspace_bytes = Model.workspace_bytes

    def __init__(self, path, stages=2, backend="numba", max_memory=None, gptq_mode="exact", address="auto",
                 cpus_per_stage=1, threads=None, micro_batches=None):
        self.path, self.backend, self.gptq_mode = path, backend, gptq_mode
        ckpt = Checkpoint(path)
        cfg = load_config(path)
        self.cfg = with_vocab(cfg, embedding_info(ckpt, cfg.dim).shape[0])
        if not isinstance(stages, int) or not 1 <= stages <= self.cfg.n_layers:
            raise DistributedError(f"--stages must be between 1 and the model's {self.cfg.n_layers} layers, "
                                   f"got {stages!r}")
        file_bytes = [sum(ckpt.info(n).nbytes for n in layer_tensor_names(ckpt, i)) for i in range(cfg.n_layers)]
        ranges = contiguous_split(file_bytes, stages)                        # [(first, stop)] per stage
        self.micro_batches = micro_batches or stages
        self.ray = connect(address)
        check_fits(self.ray, stages, cpus_per_stage, "stages")
        self.stages = [start_stage(os.path.abspath(path), backend, max_memory, gptq_mode, a, b, cpus=cpus_per_stage,
                                   threads=threads)
                       for a, b in ranges]
        try:
            ready = self._get([s.ready.remote() for s in self.stages], "loading")
        except BaseException:
            self.close()
            raise
        self.layers = PipelineLayers(self.cfg, ranges, [f"{h} (pid {p})" for h, p, _ in ready],
                                     file_bytes)

    @property
    def default_batch_tokens(self):
        """Token rows per scoring pass that every stage's remaining budget allows (eval/batching.py's rule,
        counted as if a stage held every layer's cache: on the safe side)."""
        from ..eval.batching import MAX_DEFAULT, MIN_DEFAULT, bytes_per_row
        free = min(self._get([s.free_bytes.remote() for s in self.stages], "asking for its budget"))
        return max(MIN_DEFAULT, min(MAX_DEFAULT, int(0.8 * free) // bytes_per_row(self.cfg)))

    def _get(self, refs, doing):
        """ray.get, with a stage's own error (budget, checkpoint) as the one line a person reads."""
        ray = self.ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            raise remote_error(e) from None
        except ray.exceptions.RayActorError as e:
            raise DistributedError(f"a pipeline stage died while {doing} (its node went away or ran out of "
                                   f"memory?): {e}") from None

    def new_cache(self, n_slots, max_len):
        """A KV cache for n_slots sequences of up to max_len positions, each stage holding its layers' part
        and checking it against its own budget."""
        max_len = min(max_len, self.cfg.max_seq_len)
        cid = next(_cache_ids)
        self._get([s.open_cache.remote(cid, n_slots, max_len) for s in self.stages], "opening a KV cache")
        return PipelineCache(self, cid, n_slots, max_len)

    def forward(self, chunks, cache, slots, all_logits=False):
        """model.Model.forward, through the stages: logits [sum of lengths, V] or [len(chunks), V]."""
        seqs = place_sequences(cache, slots, chunks, self.cfg.max_seq_len)
        ids = [self.check_ids(t) for t in chunks]
        groups = contiguous_split([n for _, _, n in seqs], self.micro_batches)   # [(first seq, stop seq)]
        outs = []
        for a, b in groups:                     # all groups are in flight at once: the stages overlap
            x = np.concatenate(ids[a:b])                                        # [n] token ids of the group
            for s in self.stages:
                x = s.forward.remote(cache.cid, x, seqs[a:b], all_logits)      # a reference: [n, D] float32
            outs.append(x)
        logits = self._get(outs, "running a pass")                             # [rows of group, V] each
        for slot, start, n in seqs:
            cache.lengths[slot] = start + n
        return logits[0] if len(logits) == 1 else np.concatenate(logits)      # [., V]

    def close(self):
        """Stop the stages (their memory goes back to their nodes)."""
        stop_actors(self.ray, self.stages)
        self.stages = []
