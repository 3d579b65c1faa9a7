"""One pipeline stage: a Ray actor holding a contiguous range of decoder layers resident, and their KV cache.

    stage 0      token ids [N]   -> embedding rows -> layers [0, a)   -> activations [N, D] float32
    stage k      activations     -> layers [a, b)                    -> activations [N, D]
    last stage   activations     -> layers [c, n_layers) -> final norm -> lm_head -> logits [N or B, V]

Each stage builds its layers exactly as the single-process model does (weights.load_layer, model.block), so a
pass through all stages gives the same bits as one process. Its KV cache holds only its own layers
(indexed from 0 here), and everything it holds is checked against its own node's memory budget: a stage
never streams from disk, the point of a pipeline is that each range fits where it runs.
"""

import dataclasses
import os
import socket
import time

import numpy as np

from ..checkpoint import Checkpoint, to_f32
from ..config import load_config, with_vocab
from ..errors import MemoryBudgetError, TinyLlamaError
from ..kvcache import KVCache
from ..memory import current_rss, default_budget, human, parse_size
from ..model import block, read_quant_config_if_any, reference_scratch_bytes
from ..ops import rms_norm, rope_tables
from ..streaming import JIT_RESERVE, SAFETY, SAFETY_FRACTION
from ..weights import LINEARS, embedding_info, layer_tensor_names, load_head, load_layer


def stage_bytes(ckpt, cfg, first, stop):
    """Bytes of the checkpoint tensors a stage keeps resident: its layers, and the head on the last stage
    (the embedding's rows are read from the memory map as tokens need them, as in one process)."""
    names = [n for i in range(first, stop) for n in layer_tensor_names(ckpt, i)]
    if stop == cfg.n_layers:
        names += ["model.norm.weight", "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    return sum(ckpt.info(n).nbytes for n in names if n in ckpt.tensors)


class Stage:
    """Layers [first, stop) of the checkpoint at path (wrapped with ray.remote by start_stage).

    A load error is kept and raised by ready(), so the driver can print it (a constructor that raises only
    shows up as a dead actor)."""

    def __init__(self, path, backend, max_memory, gptq_mode, first, stop):
        self.error = None
        try:
            self._load(path, backend, max_memory, gptq_mode, first, stop)
        except TinyLlamaError as e:
            self.error = type(e)(f"pipeline stage with layers {first}-{stop - 1} on {socket.gethostname()}: {e}")

    def _load(self, path, backend, max_memory, gptq_mode, first, stop):
        self.first, self.stop, self.backend = first, stop, backend
        ckpt = self.ckpt = Checkpoint(path)
        cfg = load_config(path)
        embed = embedding_info(ckpt, cfg.dim)
        self.cfg = cfg = with_vocab(cfg, embed.shape[0])
        self.is_first, self.is_last = first == 0, stop == cfg.n_layers
        self.budget = default_budget() if max_memory is None else parse_size(max_memory)
        self.weight_bytes = stage_bytes(ckpt, cfg, first, stop)
        # What one process would also set aside: LLVM compiling the kernels, the reference's temporaries.
        self.overhead = (JIT_RESERVE if backend == "numba" else 0) + reference_scratch_bytes(cfg, backend)
        self.baseline = current_rss()
        self.caches = {}                                   # cache id -> KVCache of this stage's layers
        self.passes, self.compute_seconds = 0, 0.0         # forward calls and the time inside them (bench)
        self._check_budget("its layers")
        if self.is_first:
            self.embed_weight, self.embed_dtype = ckpt.raw(embed.name), embed.dtype   # [V, D] mapped view
        if self.is_last:
            self.final_norm, self.lm_head = load_head(ckpt, cfg, backend)
        quant_config = read_quant_config_if_any(path)
        self.layers = []
        for i in range(first, stop):
            w = load_layer(ckpt, cfg, quant_config, backend, i, gptq_mode=gptq_mode)
            # Repacked tensors are the kernels' own copies now; the mapped originals would double the memory.
            ckpt.drop_pages([n for name in LINEARS for n in getattr(getattr(w, name), "copied_tensors", ())],
                            page_cache=False)   # resident: the next load repacks from RAM
            self.layers.append(dataclasses.replace(w, index=i - first))   # index = this stage's cache layer
        self.cos = self.sin = np.zeros((0, cfg.head_dim), dtype=np.float32)   # [P, hd], grown by open_cache

    def _check_budget(self, what, extra=0):
        c = self.cfg
        kv = sum(cache.nbytes for cache in self.caches.values())
        if extra > self.free_bytes():
            raise MemoryBudgetError(
                f"memory budget {human(self.budget)} cannot hold {what}: layers {self.first}-{self.stop - 1} of "
                f"{c.n_layers} ({human(self.weight_bytes)}{', with the head' if self.is_last else ''}), KV caches "
                f"{human(kv + extra)}, this process {human(self.baseline)}; give more --max-memory or more "
                f"--stages")

    def free_bytes(self):
        """Budget this stage has left for KV caches and activations."""
        kv = sum(cache.nbytes for cache in self.caches.values())
        return self.budget - (self.baseline + self.weight_bytes + kv + self.overhead + SAFETY +
                              int(SAFETY_FRACTION * self.budget))

    def ready(self):
        """(host, pid, weight bytes) once loaded; raises the load error if there was one."""
        if self.error is not None:
            raise self.error
        return socket.gethostname(), os.getpid(), self.weight_bytes

    # -- the KV cache of this stage's layers --------------------------------------------------------------
    def open_cache(self, cid, n_slots, max_len):
        c = self.cfg
        self._check_budget("a KV cache", KVCache.bytes_needed(len(self.layers), n_slots, max_len, c.n_kv_heads,
                                                              c.head_dim))
        if max_len > len(self.cos):
            self.cos, self.sin = rope_tables(max_len, c.head_dim, c.rope_theta, c.rope_scaling_factor)  # [P, hd]
        self.caches[cid] = KVCache(len(self.layers), n_slots, max_len, c.n_kv_heads, c.head_dim)
        return True

    def close_cache(self, cid):
        self.caches.pop(cid, None)

    def copy_slot(self, cid, src, dst, length):
        self.caches[cid].copy_slot(src, dst, length)

    # -- a pass ---------------------------------------------------------------------------------------------
    def forward(self, cid, x, seqs, all_logits):
        """x: token ids [N] (first stage) or activations [N, D]; seqs: (slot, start, n) per sequence.

        Returns activations [N, D] for the next stage, or on the last stage the logits (model.Model.forward).
        """
        t = time.perf_counter()
        cache = self.caches[cid]
        if self.is_first:
            x = to_f32(self.embed_weight[x], self.embed_dtype)              # [N, D]
        elif not x.flags.writeable:
            x = np.array(x)                     # Ray hands over a read-only view of its object store
        for w in self.layers:
            x = block(x, w, cache, seqs, self.cfg, self.cos, self.sin, self.backend)   # [N, D]
        for slot, start, n in seqs:
            cache.lengths[slot] = start + n
        if self.is_last:
            if not all_logits:
                x = x[np.cumsum([n for _, _, n in seqs]) - 1]                # [B, D] last row of each sequence
            x = rms_norm(x, self.final_norm, self.cfg.norm_eps, self.backend)   # [., D]
            x = self.lm_head(x)                                              # [., V]
        self.passes += 1
        self.compute_seconds += time.perf_counter() - t
        return x                                   # [N, D] activations for the next stage, or the logits

    def stats(self):
        """(forward calls, seconds spent computing them) since the last stats(): what a pass costs here."""
        out = (self.passes, self.compute_seconds)
        self.passes, self.compute_seconds = 0, 0.0
        return out


def start_stage(path, backend, max_memory, gptq_mode, first, stop, cpus=1, threads=None):
    """A Stage actor; it loads in the background (ready() says when). Options: workers.actor_options."""
    import ray
    from .workers import actor_options
    return ray.remote(Stage).options(**actor_options(cpus, threads)).remote(path, backend, max_memory, gptq_mode,
                                                                           first, stop)
