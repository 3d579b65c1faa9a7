"""Naming: which checkpoint tensors make up the embedding, each decoder layer, and the output head.

Everything returned here is a view into the memory map (plus, for the numba backend, whatever small packed
layout the GPTQ kernels prepare at load). Building a layer's weights reads no float copy of a matrix.
"""

from dataclasses import dataclass, field

import numpy as np

from .errors import CheckpointError
from .linear import make_linear

LINEARS = {
    # name in LayerWeights: (checkpoint sub-name, in_features, out_features) as functions of the config
    "q": ("self_attn.q_proj", lambda c: c.dim, lambda c: c.n_heads * c.head_dim),
    "k": ("self_attn.k_proj", lambda c: c.dim, lambda c: c.n_kv_heads * c.head_dim),
    "v": ("self_attn.v_proj", lambda c: c.dim, lambda c: c.n_kv_heads * c.head_dim),
    "o": ("self_attn.o_proj", lambda c: c.n_heads * c.head_dim, lambda c: c.dim),
    "gate": ("mlp.gate_proj", lambda c: c.dim, lambda c: c.hidden_dim),
    "up": ("mlp.up_proj", lambda c: c.dim, lambda c: c.hidden_dim),
    "down": ("mlp.down_proj", lambda c: c.hidden_dim, lambda c: c.dim),
}
NORMS = {"attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight"}   # [D] each
EMBEDDING, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
FLOAT_DTYPES = ("F32", "F16", "BF16")          # what norms, the embedding, lm_head and dense linears may be


@dataclass
class LayerWeights:
    """One decoder layer: two norms and seven linears (each callable: x [N, in] -> [N, out])."""
    index: int
    attn_norm: np.ndarray        # [D] float32
    ffn_norm: np.ndarray         # [D] float32
    q: object
    k: object
    v: object
    o: object
    gate: object
    up: object
    down: object
    tensor_names: list = field(default_factory=list)   # every checkpoint tensor this layer reads

    @property
    def nbytes(self):
        return sum(getattr(self, n).nbytes for n in LINEARS) + self.attn_norm.nbytes + self.ffn_norm.nbytes


def norm_weight(ckpt, name, dim):
    info = ckpt.info(name)
    if info.shape != (dim,):
        raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected [{dim}]")
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, expected F32, F16 or BF16")
    return np.array(ckpt.f32(name), dtype=np.float32)     # tiny: copied so it does not pin a page


def layer_tensor_names(ckpt, i):
    prefix = f"model.layers.{i}."
    return [n for n in ckpt.tensors if n.startswith(prefix)]


def load_layer(ckpt, cfg, quant_config, backend, i, streamed=False, gptq_mode="exact", cpu=None):
    """Layer i's weights; a streamed layer is used once per pass, so its kernels read the words in place."""
    prefix = f"model.layers.{i}."
    linears = {}
    for field_name, (sub, fin, fout) in LINEARS.items():
        linears[field_name] = make_linear(ckpt, prefix + sub, quant_config, backend, fin(cfg), fout(cfg),
                                          repack=not streamed, gptq_mode=gptq_mode, cpu=cpu)
    return LayerWeights(
        index=i,
        attn_norm=norm_weight(ckpt, prefix + NORMS["attn_norm"], cfg.dim),
        ffn_norm=norm_weight(ckpt, prefix + NORMS["ffn_norm"], cfg.dim),
        tensor_names=layer_tensor_names(ckpt, i),
        **linears,
    )


def load_head(ckpt, cfg, backend):
    """The final norm and lm_head (the embedding itself when the checkpoint ties them)."""
    from .linear import DenseLinear
    final_norm = norm_weight(ckpt, FINAL_NORM, cfg.dim)
    # An untied model without lm_head.weight is an error (validate.py), not a silent reuse of the embedding.
    name = EMBEDDING if cfg.tie_word_embeddings else LM_HEAD
    info = ckpt.info(name)
    if info.shape != (cfg.vocab_size, cfg.dim):
        raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected "
                              f"[{cfg.vocab_size}, {cfg.dim}] (vocab from the embedding, dim from config.json)")
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, expected F32, F16 or BF16")
    return final_norm, DenseLinear(ckpt.raw(name), info.dtype, name, backend)


def embedding_info(ckpt, cfg_dim):
    name = EMBEDDING
    info = ckpt.info(name)
    if len(info.shape) != 2 or info.shape[1] != cfg_dim:
        raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected "
                              f"[vocab, {cfg_dim}] (hidden_size from config.json)")
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, expected F32, F16 or BF16")
    return info
