"""What a checkpoint is, and what running it will cost on this machine (the `inspect` command)."""

import os

from .. import load
from ..kernels.cpu import describe as cpu_describe
from ..kvcache import KVCache
from ..memory import human
from ..validate import check_gptq_indices


def describe(checkpoint, max_memory=None, measure=True):
    """A dict of plain facts about the checkpoint, plus the memory plan and a seconds-per-token estimate.

    The estimate is the streaming bound: resident weight bytes / memory bandwidth + streamed bytes / disk
    bandwidth, both measured now; real decoding adds compute, so treat it as a floor.
    """
    model = load(checkpoint, backend="numba", max_memory=max_memory)    # validate.py's pass: exit 1 on failure
    c, ckpt, src = model.cfg, model.ckpt, model.layers
    check_gptq_indices(ckpt, c, model.quant_config)                    # and the g_idx values, which load leaves
    q = model.quant_config
    quant = "none (dense " + ckpt.info("model.layers.0.self_attn.q_proj.weight").dtype + ")" if q is None else \
        (f"GPTQ {q.bits}-bit, group size {q.group_size}, act-order {'yes' if q.desc_act else 'no'}, "
         f"{'sym' if q.sym else 'asym'}, format {q.checkpoint_format}")
    weight_bytes = sum(src.file_bytes)
    info = {
        "checkpoint": os.path.abspath(checkpoint),
        "architecture": (f"Llama: {c.n_layers} layers, hidden {c.dim}, ffn {c.hidden_dim}, {c.n_heads} heads "
                         f"({c.n_kv_heads} kv heads, head_dim {c.head_dim})"),
        "vocabulary": f"{c.vocab_size} (embedding rows, {model.embed_dtype})",
        "context": f"{c.max_seq_len} positions, rope theta {c.rope_theta:g}"
                   + (f", linear scaling x{c.rope_scaling_factor:g}" if c.rope_scaling_factor != 1 else ""),
        "quantization": quant,
        "tensors": f"{len(ckpt.tensors)} in {len(ckpt.files)} file(s)",
        "bytes on disk": human(sum(f.size for f in ckpt.files.values())),
        "decoder weights": f"{human(weight_bytes)} ({human(weight_bytes / c.n_layers)} per layer)",
        "kv cache": f"{human(KVCache.bytes_needed(c.n_layers, 1, 1024, c.n_kv_heads, c.head_dim))} per 1024 tokens",
        "memory plan": src.describe(),
        "kernels": f"CPU tier {cpu_describe()} (docs/kernels.md)",
    }
    if os.path.exists(os.path.join(checkpoint, "tokenizer.model")):
        tok = model.tokenizer
        added = ", ".join(f"{t} = {i}" for i, t in sorted((t.id, t.text) for t in tok.added.values()))
        info["tokenizer"] = f"SentencePiece, {tok.n_sp} pieces" + (f"; added: {added}" if added else "")
    else:
        info["tokenizer"] = "none (tokenizer.model missing: use --prompt-ids)"
    if measure:
        from .bandwidth import disk_read_gbps, memory_read_gbps
        mem = memory_read_gbps(256 * 2**20, repeats=5)
        biggest = max(ckpt.files, key=lambda p: ckpt.files[p].size)
        disk = disk_read_gbps(biggest, 256 * 2**20)
        resident = src.resident_bytes() + model.lm_head.nbytes
        streamed = src.streamed_bytes_per_pass()
        seconds = resident / (mem * 1e9) + streamed / (disk * 1e9)
        info["measured bandwidth"] = f"memory {mem:.1f} GB/s, disk {disk:.2f} GB/s (uncached read)"
        info["expected decode"] = (f">= {seconds:.3f} s/token (batch 1): {human(resident)} from memory + "
                                   f"{human(streamed)} from disk per token")
        peak = src._fixed() + src.resident_bytes() + (2 * max(src.file_bytes) if streamed else 0)
        info["peak memory"] = f"about {human(peak)} without KV cache (budget {human(src.budget)})"
    return info
