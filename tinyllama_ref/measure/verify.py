"""Layer-by-layer comparison of our forward pass against transformers' Llama on the same weights.

Two independent chains start from the same embedding rows:

    ours:    x0 -> tinyllama_ref.model.block (layer 0) -> ... -> final norm -> lm_head
    theirs:  x0 -> transformers LlamaDecoderLayer (layer 0) -> ... -> LlamaRMSNorm -> lm_head

and after every layer the two hidden states are compared. The reference side never touches our checkpoint
reader: it reads tensors with a few lines of plain file reads (ReferenceTensors); dense weights go into the
transformers layer as stored (widened to float32), GPTQ weights are dequantized by our NumPy reference
(quant.dequantize) into a plain float32 `nn.Linear`. Only ONE transformers decoder layer exists at a time, built on the "meta" device and then
given its real tensors, so even a 70B checkpoint needs one float32 layer (about 3.4 GB) on that side.

Because errors compound along a chain, a per-layer "local" error is measured too: our block is also run on
transformers' input to that layer (as a second sequence of the same batch, so each of our layers is read once).
The first layer whose local error is outside the tolerance is the first layer that computes differently.

torch and transformers are an optional extra (pip install -e '.[verify]' in the tinyllama-ref source
directory) and are imported lazily.
"""

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from ..errors import CheckpointError, TinyLlamaError
from ..model import block
from ..ops import log_softmax, rms_norm


class VerifyDependencyError(TinyLlamaError):
    """torch or transformers is not installed."""


def _import_torch():
    """torch and transformers' Llama modules, or a one-line explanation of how to get them."""
    try:
        import torch
        from transformers import LlamaConfig as HFLlamaConfig
        from transformers.models.llama import modeling_llama
    except ImportError as e:
        raise VerifyDependencyError(
            f"verify needs PyTorch and transformers: pip install -e '.[verify]' in the tinyllama-ref source "
            f"directory ({e})") from None
    return torch, HFLlamaConfig, modeling_llama


# -- tolerances ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    """When two float32 computations of the same model count as the same.

    Both sides compute in float32 from identical weights, so the only differences are the order of float32
    sums (BLAS blocking, our softmax vs torch's). Measured on the tiny test models: hidden states agree to
    ~1e-7 relative per layer and logits to ~1e-6; a 0.1% change to one norm weight already moves a layer by
    ~1e-3. The defaults sit two orders of magnitude above the round-off and one below a real bug, and leave
    room for 80 layers of accumulation on a 70B model.
    """
    hidden_rel: float = 1e-4        # max |ours - theirs| / max |theirs|, per layer (chained and local)
    hidden_cos: float = 1 - 1e-6    # smallest per-position cosine similarity of the hidden states
    logits_rel: float = 1e-4        # max |ours - theirs| / max |theirs| over all positions and the vocabulary
    kl: float = 1e-6                # mean over positions of KL(theirs || ours), nats


@dataclass
class LayerRow:
    index: int
    max_abs: float        # chained: max |ours - theirs|
    rel: float            # chained: max_abs / max |theirs|
    cos: float            # chained: smallest per-position cosine similarity
    local_rel: float      # our block on THEIR input vs theirs, / max |theirs|

    def ok(self, tol):
        return self.rel <= tol.hidden_rel and self.cos >= tol.hidden_cos and self.local_rel <= tol.hidden_rel


@dataclass
class LogitsRow:
    max_abs: float
    rel: float
    kl: float             # mean over positions of KL(theirs || ours)
    top1: float           # fraction of positions with the same arg max
    top1_unexplained: int  # disagreements where theirs' margin is larger than the logits' max difference

    def ok(self, tol):
        return self.rel <= tol.logits_rel and self.kl <= tol.kl and self.top1_unexplained == 0


@dataclass
class VerifyReport:
    checkpoint: str
    kind: str                         # "dense F16", "GPTQ 4-bit g128 act-order", ...
    backend: str
    n_tokens: int
    tolerance: Tolerance
    layers: list = field(default_factory=list)
    logits: LogitsRow = None

    @property
    def first_diverging_layer(self):
        """The first layer that computes differently from transformers given the same input, else None."""
        for row in self.layers:
            if row.local_rel > self.tolerance.hidden_rel:
                return row.index
        for row in self.layers:                    # no single layer is off, yet the chain drifted
            if not row.ok(self.tolerance):
                return row.index
        return None

    @property
    def passed(self):
        return all(r.ok(self.tolerance) for r in self.layers) and self.logits.ok(self.tolerance)


# -- the metrics ---------------------------------------------------------------------------------------------

def hidden_metrics(ours, theirs):
    """max |diff|, that over max |theirs|, and the smallest per-position cosine similarity ([T, D] each)."""
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    diff = np.abs(ours - theirs)                                          # [T, D]
    scale = max(float(np.abs(theirs).max()), 1e-30)
    dots = np.sum(ours * theirs, axis=-1)                                 # [T]
    norms = np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1)   # [T]
    cos = np.where(norms > 0, dots / np.maximum(norms, 1e-300), 1.0)      # [T]
    return float(diff.max()), float(diff.max()) / scale, float(cos.min())


def logits_metrics(ours, theirs):
    """Max difference, mean KL(theirs || ours), top-1 agreement over all positions ([T, V] each).

    A top-1 disagreement only counts as a failure when transformers' own margin between its choice and ours is
    larger than the largest logit difference: a near-tie may flip under float32 round-off and that is no bug.
    """
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    diff = np.abs(ours - theirs)                                          # [T, V]
    max_abs = float(diff.max())
    rel = max_abs / max(float(np.abs(theirs).max()), 1e-30)
    log_p, log_q = log_softmax(theirs), log_softmax(ours)                 # [T, V]
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    top_theirs, top_ours = theirs.argmax(-1), ours.argmax(-1)             # [T]
    rows = np.arange(len(theirs))
    margin = theirs[rows, top_theirs] - theirs[rows, top_ours]            # [T] >= 0
    unexplained = int(np.sum((top_theirs != top_ours) & (margin > 2 * max_abs)))
    return LogitsRow(max_abs, rel, max(kl, 0.0), float(np.mean(top_theirs == top_ours)), unexplained)


# -- the reference side: transformers, one decoder layer at a time --------------------------------------------

class ReferenceTensors:
    """Checkpoint tensors for the transformers side, read with plain file reads, independently of checkpoint.py.

    Not the safetensors package: its loader memory-maps the whole file copy-on-write, which the kernel refuses
    for a file larger than RAM (seen: "unable to mmap 28029674528 bytes ... Cannot allocate memory" for a 3-bit
    70B file on a 23 GB machine). Reading exactly the bytes of one tensor into a fresh buffer also means the
    memory is given back as soon as the reference layer is freed.
    """

    def __init__(self, directory):
        import torch
        self.torch = torch
        self.dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
                       "I64": torch.int64, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        self.where = {}       # name -> (path, dtype, shape, absolute start byte, end byte)
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                n = int(np.frombuffer(f.read(8), dtype="<u8")[0])            # header length
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, e in header.items():
                begin, end = e["data_offsets"]
                self.where[key] = (path, e["dtype"], tuple(e["shape"]), 8 + n + begin, 8 + n + end)

    def __contains__(self, name):
        return name in self.where

    def _entry(self, name):
        if name not in self.where:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        return self.where[name]

    def _read(self, path, start, end, dtype, shape):
        buf = bytearray(end - start)
        with open(path, "rb") as f:
            f.seek(start)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{path}: file ends inside a tensor (truncated download?)")
        return self.torch.frombuffer(buf, dtype=self.dtypes[dtype]).reshape(shape)

    def get(self, name):
        path, dtype, shape, start, end = self._entry(name)
        return self._read(path, start, end, dtype, shape)

    def f32(self, name):
        return self.get(name).to(self.torch.float32)

    def rows(self, name, r0, r1):
        """Rows r0..r1 of a 2-D tensor as float32, reading only their bytes (embedding rows, lm_head slabs)."""
        path, dtype, shape, start, end = self._entry(name)
        row_bytes = (end - start) // shape[0]
        return self._read(path, start + r0 * row_bytes, start + r1 * row_bytes, dtype,
                          (r1 - r0, *shape[1:])).to(self.torch.float32)


def dequantized_weight(tensors, prefix, quant_config, in_features, out_features, columns_per_step=1024):
    """A GPTQ linear as a float32 torch weight [out, in] (nn.Linear layout), dequantized by quant.dequantize a
    slab of output columns at a time so the unpacking temporaries stay small for 28672-wide 70B layers."""
    import torch
    from ..quant import default_g_idx, dequantized_slabs
    qweight = tensors.get(prefix + ".qweight").numpy()                    # [in * bits / 32, out]
    qzeros = tensors.get(prefix + ".qzeros").numpy()                      # [G, out * bits / 32]
    scales = tensors.get(prefix + ".scales").numpy()                      # [G, out]
    g_idx = (tensors.get(prefix + ".g_idx").numpy() if prefix + ".g_idx" in tensors
             else default_g_idx(in_features, quant_config.group_size))    # [in]
    weight = torch.empty(out_features, in_features, dtype=torch.float32)  # [out, in]
    for j0, j1, w in dequantized_slabs(qweight, qzeros, scales, g_idx, quant_config.bits,
                                       quant_config.checkpoint_format, columns_per_step):   # w [in, j1 - j0]
        weight[j0:j1] = torch.from_numpy(np.ascontiguousarray(w.T))       # [j1 - j0, in]
    return weight


LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def reference_layer(modeling, hf_config, tensors, quant_config, i):
    """transformers' LlamaDecoderLayer i in float32 with the checkpoint's weights (no random init first)."""
    import torch
    with torch.device("meta"):
        layer = modeling.LlamaDecoderLayer(hf_config, layer_idx=i)
    prefix = f"model.layers.{i}."
    state = {}
    for name, param in layer.named_parameters():
        stem = name[:-len(".weight")] if name.endswith(".weight") else name
        if stem in LINEAR_NAMES and prefix + stem + ".qweight" in tensors:
            out_features, in_features = param.shape
            state[name] = dequantized_weight(tensors, prefix + stem, quant_config, in_features, out_features)
            # Older AutoGPTQ writers store an all-zero bias; a Llama layer has no bias to put a real one in.
            if prefix + stem + ".bias" in tensors and bool(tensors.get(prefix + stem + ".bias").any()):
                raise CheckpointError(f"{prefix + stem}.bias is not zero, but Llama layers have no bias "
                                      "(is this a Llama checkpoint?)")
        else:
            state[name] = tensors.f32(prefix + name)
    layer.load_state_dict(state, assign=True, strict=True)
    return layer.eval()


def hf_config_for(checkpoint_dir, HFLlamaConfig):
    with open(os.path.join(checkpoint_dir, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    hf.pop("quantization_config", None)        # the reference layer is a plain float32 Llama
    cfg = HFLlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"         # explicit additive causal mask, softmax in float32
    return cfg


def reference_layer_bytes(cfg, n_tokens):
    """What the transformers side holds at once: a float32 decoder layer, the unpacking temporaries of one
    1024-column slab of its widest GPTQ linear (int64 codes, words and floats: ~32 bytes an entry), its
    activations, and one 4096-row slab of the float32 lm_head."""
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    params = cfg.dim * (2 * q_out + 2 * kv_out) + 3 * cfg.dim * cfg.hidden_dim + 2 * cfg.dim
    slab = 32 * max(cfg.dim, cfg.hidden_dim) * 1024
    activations = 4 * n_tokens * (6 * cfg.dim + 3 * cfg.hidden_dim) + 4 * 3 * cfg.n_heads * n_tokens ** 2
    return 4 * params + slab + activations + 4 * 4096 * cfg.dim


# -- the comparison -----------------------------------------------------------------------------------------

def compare(checkpoint_dir, token_ids, backend="numpy", max_memory=None, tolerance=None, model=None,
            on_layer=None):
    """Run our model and transformers on the same weights and token ids; return a VerifyReport.

    `model` may be an already loaded tinyllama_ref Model of the same checkpoint (saves loading it twice).
    `on_layer(row, n_layers)` is called as each LayerRow is measured (a 70B run takes a while).
    """
    torch, HFLlamaConfig, modeling = _import_torch()
    from .. import load
    from ..quant import read_quant_config
    ours = model or load(checkpoint_dir, backend=backend, max_memory=max_memory)
    ids = ours.check_ids(token_ids)                                       # [T]
    if len(ids) == 0:
        raise TinyLlamaError("verify needs at least one token id")
    if len(ids) > ours.cfg.max_seq_len:
        raise TinyLlamaError(f"{len(ids)} tokens exceed the model's context of {ours.cfg.max_seq_len}")
    ref = Reference(torch, modeling, hf_config_for(checkpoint_dir, HFLlamaConfig), ReferenceTensors(checkpoint_dir),
                    read_quant_config(checkpoint_dir) if ours.quant_config else None)
    report = VerifyReport(checkpoint_dir, describe(ours), ours.backend, len(ids), tolerance or Tolerance())
    # Our model's memory budget must leave room for the reference side: one float32 transformers layer, the
    # dequantization temporaries of its widest linear, and both sides' activations.
    reservations = {"verify: one transformers layer": reference_layer_bytes(ours.cfg, len(ids)),
                    "activations": ours.workspace_bytes(2 * len(ids), len(ids), all_logits=True)}
    with ExitStack() as held:
        for what, nbytes in reservations.items():
            held.enter_context(ours.layers.reserve(what, nbytes))
        with torch.no_grad():               # inference only; a context, so the caller's autograd state is kept
            run_chains(ours, ref, ids, report, on_layer)
    return report


@dataclass
class Reference:
    """Everything the transformers side needs."""
    torch: object
    modeling: object          # transformers.models.llama.modeling_llama
    hf_config: object         # transformers LlamaConfig, eager attention
    tensors: ReferenceTensors
    quant_config: object      # quant.QuantConfig or None


def run_chains(ours, ref, ids, report, on_layer=None):
    """Both chains from the same embedding rows, layer by layer, then the logits; fills report in place."""
    torch, cfg, T = ref.torch, ours.cfg, len(ids)
    embed_name = "model.embed_tokens.weight"
    x_ours = ours.embed(ids)                                              # [T, D]
    theirs = torch.cat([ref.tensors.rows(embed_name, int(t), int(t) + 1) for t in ids])[None]   # [1, T, D]
    positions = torch.arange(T)[None]                                     # [1, T]
    cos_sin = ref.modeling.LlamaRotaryEmbedding(ref.hf_config)(theirs, positions)   # ([1, T, hd], [1, T, hd])
    mask = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]   # [1, 1, T, T] causal

    # Our side runs two sequences per layer: slot 0 is our chain, slot 1 is our block on THEIR input.
    with ours.new_cache(2, T) as cache:
        seqs = [(0, 0, T), (1, 0, T)]
        for i, w in enumerate(ours.layers):
            their_in = theirs[0].numpy()                                      # [T, D]
            both = block(np.concatenate([x_ours, their_in]), w, cache, seqs, cfg, ours.cos, ours.sin)   # [2T, D]
            x_ours, local = both[:T], both[T:]                                # [T, D] each
            layer = reference_layer(ref.modeling, ref.hf_config, ref.tensors, ref.quant_config, i)
            theirs = layer(theirs, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
            del layer                                                         # one reference layer at a time
            their_out = theirs[0].numpy()                                     # [T, D]
            max_abs, rel, cos = hidden_metrics(x_ours, their_out)
            local_rel = float(np.abs(local - their_out).max()) / max(float(np.abs(their_out).max()), 1e-30)
            report.layers.append(LayerRow(i, max_abs, rel, cos, local_rel))
            if on_layer:
                on_layer(report.layers[-1], cfg.n_layers)

    logits_ours = ours.lm_head(rms_norm(x_ours, ours.final_norm, cfg.norm_eps))    # [T, V]
    norm = ref.modeling.LlamaRMSNorm(cfg.dim, eps=ref.hf_config.rms_norm_eps)
    norm.weight.data = ref.tensors.f32("model.norm.weight")
    h = norm(theirs)[0]                                                   # [T, D]
    head = embed_name if (cfg.tie_word_embeddings or "lm_head.weight" not in ref.tensors) else "lm_head.weight"
    chunks = [h @ ref.tensors.rows(head, v0, min(cfg.vocab_size, v0 + 4096)).T      # [T, <= 4096]
              for v0 in range(0, cfg.vocab_size, 4096)]                   # the head a slab of rows at a time
    report.logits = logits_metrics(logits_ours, torch.cat(chunks, dim=-1).numpy())  # [T, V] each


def describe(model):
    q = model.quant_config
    if q is None:
        dtype = model.ckpt.info("model.layers.0.self_attn.q_proj.weight").dtype
        return f"dense {dtype}"
    group = "" if q.group_size == -1 else f" g{q.group_size}"
    return f"GPTQ {q.bits}-bit{group}{' act-order' if q.desc_act else ''} ({q.checkpoint_format})"


# -- the table ----------------------------------------------------------------------------------------------

def format_report(report):
    """A Markdown table per layer plus the logits line and the verdict (what `tinyllama-ref verify` prints)."""
    tol = report.tolerance
    lines = [
        f"{report.checkpoint}: {report.kind}, {report.n_tokens} tokens, backend {report.backend}, "
        "against transformers (float32)",
        "",
        "| layer | max abs diff | rel diff | min cosine | rel diff, same input | |",
        "|---:|---:|---:|---:|---:|:---|",
    ]
    for r in report.layers:
        lines.append(f"| {r.index} | {r.max_abs:.3e} | {r.rel:.3e} | {r.cos:.9f} | {r.local_rel:.3e} | "
                     f"{'ok' if r.ok(tol) else 'DIFFERS'} |")
    lg = report.logits
    lines += [
        "",
        "| logits | max abs diff | rel diff | KL(theirs‖ours) | top-1 agreement | |",
        "|---|---:|---:|---:|---:|:---|",
        f"| all positions | {lg.max_abs:.3e} | {lg.rel:.3e} | {lg.kl:.3e} | {lg.top1 * 100:.1f}% | "
        f"{'ok' if lg.ok(tol) else 'DIFFERS'} |",
        "",
        f"tolerance: rel diff <= {tol.hidden_rel:g} per layer, cosine >= {tol.hidden_cos:.9f}, "
        f"logits rel diff <= {tol.logits_rel:g}, KL <= {tol.kl:g}, no top-1 flip beyond round-off",
    ]
    first = report.first_diverging_layer
    if report.passed:
        lines.append("PASS: every layer and the logits agree with transformers within tolerance")
    elif first is not None:
        lines.append(f"FAIL: layer {first} is the first to diverge from transformers")
    else:
        lines.append("FAIL: the layers agree but the logits (final norm / lm_head) differ")
    return "\n".join(lines)
