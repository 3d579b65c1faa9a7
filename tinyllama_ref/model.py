"""The Llama-2 forward pass, top to bottom.

    token ids -> embedding rows -> n_layers x block -> final RMSNorm -> lm_head -> logits

    block(x):  h   = x + attention(rms_norm(x))      (grouped-query, rotary positions, KV cache)
               out = h + mlp(rms_norm(h))            (SwiGLU: down(silu(gate(x)) * up(x)))

Rows of x are tokens; several sequences of a batch are packed one after another (see attention.py), so each
weight matrix is read once per pass for the whole batch. Layers come from a layer source that may keep them
resident or stream them from disk (streaming.py): the forward pass does not care which.
"""

import os
import sys
import time
from contextlib import nullcontext

import numpy as np

from .attention import QUERY_BLOCK, attention
from .checkpoint import Checkpoint, to_f32
from .config import load_config, read_json, with_vocab
from .errors import GenerationError
from .generate import generate_ids
from .kvcache import KVCache
from .linear import BACKENDS
from .ops import rms_norm, rope_tables, swiglu
from .quant import check_cpu, check_gptq_mode, read_quant_config
from .streaming import LayerSource
from .threads import chooser_for, using_threads
from .token_ids import check_token_ids
from .validate import validate_checkpoint
from .weights import embedding_info, load_head


DECODE_ROWS = 32      # passes of up to this many rows are "decode" for the thread chooser (the fused GEMV)


def mlp(x, w, backend="numpy"):
    """SwiGLU feed-forward: x [N, D] -> [N, D]."""
    return w.down(swiglu(w.gate(x), w.up(x), backend))          # [N, F] inside, [N, D] out


def block(x, w, cache, seqs, cfg, cos, sin, backend="numpy"):
    """One decoder layer: pre-norm attention and pre-norm MLP, each with a residual connection. backend
    "numba" spreads the element-wise steps and attention heads over the threads (ops.py, attention.py)."""
    h = x + attention(rms_norm(x, w.attn_norm, cfg.norm_eps, backend), w, cache, w.index, seqs, cfg, cos, sin,
                      backend)
    return h + mlp(rms_norm(h, w.ffn_norm, cfg.norm_eps, backend), w, backend)    # [N, D]


def read_quant_config_if_any(path):
    """The GPTQ settings, or None for a dense checkpoint."""
    has_block = os.path.exists(os.path.join(path, "quantize_config.json")) or \
        "quantization_config" in read_json(os.path.join(path, "config.json"))
    if not has_block:
        return None
    return read_quant_config(path)


def place_sequences(cache, slots, chunks, max_seq_len):
    """[(slot, start, n)]: where each sequence's n new tokens go in its cache slot; a GenerationError when they
    would not fit the cache or the model's context. (Model.forward and the pipeline's forward both use it.)"""
    seqs = []
    for slot, toks in zip(slots, chunks):
        start = int(cache.lengths[slot])
        if start + len(toks) > min(cache.max_len, max_seq_len):
            raise GenerationError(f"sequence of {start + len(toks)} tokens does not fit the context of "
                                  f"{min(cache.max_len, max_seq_len)} positions")
        seqs.append((int(slot), start, len(toks)))
    return seqs


class Model:
    """A loaded checkpoint's forward pass. `tinyllama_ref.load(path)` wraps it with its tokenizer (text.py)."""

    def __init__(self, path, backend="numba", max_memory=None, gptq_mode="exact", quiet=True, threads=None,
                 cpu=None):
        if backend not in BACKENDS:
            raise GenerationError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.path = path
        self.backend = backend
        self.threads = chooser_for(backend, threads)         # threads per pass (threads.py)
        # The kernels' CPU tier (kernels/cpu.py): a name given is checked now; None is this process's tier,
        # probed when the first GPTQ layer is built (a dense model never needs it).
        self.cpu = check_cpu(cpu) if backend == "numba" and cpu is not None else None
        self.gptq_mode = check_gptq_mode(gptq_mode, self.cpu)
        self.ckpt = Checkpoint(path)
        # config.json first: it says hidden_size, which the embedding's shape is checked against.
        cfg = load_config(path)
        self.quant_config = read_quant_config_if_any(path)
        validate_checkpoint(path, self.ckpt, cfg, self.quant_config)   # everything, before anything is built
        embed = embedding_info(self.ckpt, cfg.dim)
        self.cfg = with_vocab(cfg, embed.shape[0])
        self.embed_weight = self.ckpt.raw(embed.name)              # [V, D] view, stored dtype
        self.embed_dtype = embed.dtype
        self.final_norm, self.lm_head = load_head(self.ckpt, self.cfg, backend)
        self.layers = LayerSource(self.ckpt, self.cfg, self.quant_config, backend, gptq_mode, max_memory,
                                  fixed_bytes=self.lm_head.nbytes + self.final_norm.nbytes,
                                  scratch_bytes=reference_scratch_bytes(self.cfg, backend)
                                  + streamed_repack_bytes(self.cfg, self.quant_config, backend, self.gptq_mode,
                                                          self.cpu),
                                  cpu=self.cpu)
        if not quiet:
            print(self.layers.describe(), file=sys.stderr)
        # RoPE tables are built for the longest cache asked for so far (new_cache), not for the config's
        # max_position_embeddings, which a config may set to anything.
        self.cos = self.sin = np.zeros((0, self.cfg.head_dim), dtype=np.float32)   # [P, hd]

    # -- the pieces ---------------------------------------------------------------------------------------
    def check_ids(self, ids):
        """ids as an int64 array [N], or a GenerationError when they are not token ids this model can embed."""
        return check_token_ids(ids, self.cfg.vocab_size, GenerationError)

    def embed(self, ids):
        """Gather embedding rows straight from the memory map: [N] -> [N, D] float32."""
        return to_f32(self.embed_weight[ids], self.embed_dtype)    # [N, D]

    def new_cache(self, n_slots, max_len):
        """A KV cache for n_slots sequences of up to max_len positions, counted in the memory budget (with
        the RoPE tables it needs) until it is closed: `with model.new_cache(...) as cache:`."""
        c = self.cfg
        max_len = min(max_len, c.max_seq_len)
        rope_bytes = 2 * max(0, max_len - len(self.cos)) * c.head_dim * 4
        name = "KV cache"
        while name in self.layers.reserved:            # several caches may be open at once (a server's, a score's)
            name += "+"
        reservation = self.layers.reserve(name, KVCache.bytes_needed(c.n_layers, n_slots, max_len, c.n_kv_heads,
                                                                     c.head_dim) + rope_bytes)
        if max_len > len(self.cos):
            self.cos, self.sin = rope_tables(max_len, c.head_dim, c.rope_theta, c.rope_scaling_factor)  # [P, hd]
        return KVCache(c.n_layers, n_slots, max_len, c.n_kv_heads, c.head_dim, reservation=reservation)

    def workspace_bytes(self, n_rows, longest_context, all_logits):
        """A generous estimate of the activations one pass allocates (see attention.py's query blocks)."""
        c = self.cfg
        per_row = 8 * c.dim + 2 * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + 4 * c.hidden_dim
        scores = 3 * c.n_heads * min(n_rows, QUERY_BLOCK) * longest_context
        logits = (n_rows if all_logits else 1) * c.vocab_size * 2
        return 4 * (n_rows * per_row + scores + logits)

    def forward(self, chunks, cache, slots, all_logits=False):
        """Run new tokens through the model and extend the cache.

        chunks: one int array of new token ids per sequence; slots: the cache slot of each sequence.
        Returns logits [sum of lengths, V] when all_logits, else the last position's [len(chunks), V].
        """
        seqs = place_sequences(cache, slots, chunks, self.cfg.max_seq_len)
        ids = np.concatenate([self.check_ids(t) for t in chunks])    # [N]
        longest = max(start + n for _, start, n in seqs)
        # The workspace stays reserved after the pass: it is the high-water mark the allocator keeps.
        self.layers.reserve("activations", max(self.layers.reserved.get("activations", 0),
                                               self.workspace_bytes(len(ids), longest, all_logits)))
        # Decode passes (a few rows) split each matmul statically over the threads, so a busy core slows them
        # all; their thread count leaves the cores other processes hold (threads.py). Prefill shares work
        # dynamically (kernels/slabs.py) and always uses every thread.
        kind = ("decode", len(ids)) if len(ids) <= DECODE_ROWS else None
        n_threads = self.threads.choose(kind)
        t = time.perf_counter()
        with using_threads(n_threads) if self.backend == "numba" else nullcontext():
            x = self.embed(ids)                                      # [N, D]
            for w in self.layers:
                x = block(x, w, cache, seqs, self.cfg, self.cos, self.sin, self.backend)   # [N, D]
        if kind:
            self.threads.record(kind, n_threads, time.perf_counter() - t)
        for slot, start, n in seqs:
            cache.lengths[slot] = start + n
        if not all_logits:
            x = x[np.cumsum([n for _, _, n in seqs]) - 1]            # [B, D] last row of each sequence
        x = rms_norm(x, self.final_norm, self.cfg.norm_eps, self.backend)   # [., D]
        return self.lm_head(x)                                       # [., V]

    # -- the public API -----------------------------------------------------------------------------------
    def logits(self, token_ids):
        """Teacher-forced logits for one sequence: [len(token_ids), V] float32."""
        ids = self.check_ids(token_ids)
        if len(ids) == 0:
            raise GenerationError("empty token sequence: nothing to score")
        if len(ids) > self.cfg.max_seq_len:
            raise GenerationError(f"{len(ids)} tokens exceed the model's context of {self.cfg.max_seq_len}")
        with self.new_cache(1, len(ids)) as cache:
            return self.forward([ids], cache, [0], all_logits=True)

    def generate(self, token_ids, max_new_tokens=16, temperature=0.0, **sampling):
        """New token ids after the prompt (a list of ints), or one list per prompt for a batch of prompts."""
        if isinstance(token_ids, (str, bytes, dict)) or not hasattr(token_ids, "__len__"):
            raise GenerationError(f"token ids must be a list of integers (or one list per prompt), got "
                                  f"{type(token_ids).__name__}")
        batch = len(token_ids) > 0 and not np.isscalar(token_ids[0])
        prompts = [list(p) for p in token_ids] if batch else [list(token_ids)]
        outs = generate_ids(self, prompts, max_new_tokens=max_new_tokens, temperature=temperature, **sampling)
        return outs if batch else outs[0]


def streamed_repack_bytes(cfg, quant_config, backend, gptq_mode, cpu=None):
    """--gptq-mode int8 copies a streamed act-order matrix in group order for each many-row call (kernels/
    gptq.repack_inplace), one matrix at a time: the largest copy (its codes and its row order) is counted.
    Nothing where no matrix is copied (gptq.int8_copies_inplace)."""
    if backend != "numba" or gptq_mode != "int8" or quant_config is None or not quant_config.desc_act:
        return 0
    from .kernels.gptq import int8_copies_inplace
    widths = (cfg.dim, cfg.hidden_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)   # n_out
    if not any(int8_copies_inplace(quant_config.bits, w, cpu) for w in widths):
        return 0                # e.g. 4 bits with AMX: streamed layers stay on their exact code tiles
    largest = max(cfg.dim * cfg.hidden_dim, cfg.dim * cfg.n_heads * cfg.head_dim)   # weights of one matrix
    return largest * quant_config.bits // 8 + 16 * max(cfg.dim, cfg.hidden_dim)


def reference_scratch_bytes(cfg, backend):
    """The numpy reference widens a whole matrix to float32 (and GPTQ codes to ints) when it multiplies: the
    largest such temporary must fit in the budget too. The numba kernels read the stored words directly."""
    if backend == "numba":
        return 0
    return 8 * max(cfg.vocab_size * cfg.dim, cfg.dim * max(cfg.hidden_dim, cfg.n_heads * cfg.head_dim))
