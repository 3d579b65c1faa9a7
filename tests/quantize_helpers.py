"""Test helpers for verify and quantize: GPTQ checkpoints from the independent packer, a tiny TRAINED Llama,
calibration token streams with correlated activations, round-to-nearest, perplexity.

Nothing here imports the code under test's quantizer (gptq.py / quantize.py).
"""

import json
import os
import shutil

import numpy as np

from gptq_packer import make_layer, quantize_config, write_gptq_checkpoint

LINEARS = {   # checkpoint sub-name -> (in, out) as functions of the HF config dict
    "self_attn.q_proj": (lambda c: c["hidden_size"], lambda c: c["num_attention_heads"] * _hd(c)),
    "self_attn.k_proj": (lambda c: c["hidden_size"], lambda c: c["num_key_value_heads"] * _hd(c)),
    "self_attn.v_proj": (lambda c: c["hidden_size"], lambda c: c["num_key_value_heads"] * _hd(c)),
    "self_attn.o_proj": (lambda c: c["num_attention_heads"] * _hd(c), lambda c: c["hidden_size"]),
    "mlp.gate_proj": (lambda c: c["hidden_size"], lambda c: c["intermediate_size"]),
    "mlp.up_proj": (lambda c: c["hidden_size"], lambda c: c["intermediate_size"]),
    "mlp.down_proj": (lambda c: c["intermediate_size"], lambda c: c["hidden_size"]),
}


def _hd(c):
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def read_dense(path):
    """All tensors of a dense checkpoint dir as float32 NumPy arrays, read with the safetensors package."""
    import torch
    from safetensors import safe_open
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key).to(torch.float32).numpy()
    return out


def make_gptq_checkpoint(dense_dir, out_dir, bits=4, group_size=32, act_order=True, sym=True,
                         checkpoint_format="gptq", seed=0):
    """A GPTQ checkpoint with random codes packed by tests/gptq_packer.py; embedding, norms and head are the
    dense checkpoint's (as fp16). Returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(dense_dir, "config.json")) as f:
        cfg = json.load(f)
    dense = read_dense(dense_dir)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, array in dense.items():
        if not any(name.endswith(sub + ".weight") for sub in LINEARS):
            tensors[name] = array.astype(np.float16)
    for i in range(cfg["num_hidden_layers"]):
        for sub, (fin, fout) in LINEARS.items():
            layer = make_layer(rng, fin(cfg), fout(cfg), bits, group_size, act_order=act_order, sym=sym,
                               checkpoint_format=checkpoint_format)
            for t in ("qweight", "qzeros", "scales", "g_idx"):
                tensors[f"model.layers.{i}.{sub}.{t}"] = layer[t]
    qc = quantize_config(bits, group_size, act_order, sym, checkpoint_format)
    return write_gptq_checkpoint(out_dir, tensors, cfg, qc)


# -- a tiny model that has learnt something, and text for it ------------------------------------------------

def pattern_corpus(seed, n_tokens, vocab=96, n_words=12, word_len=(3, 6)):
    """Token ids from a small 'language': a fixed set of multi-token words, chosen by a sparse Markov chain.

    Few distinct tokens in recurring n-grams make the inputs of every linear layer strongly correlated, the
    situation in which GPTQ's error feedback beats rounding each weight to its nearest grid point.
    """
    rng = np.random.default_rng(1234)                  # the language is fixed; `seed` picks the text
    words = [rng.integers(3, vocab, size=rng.integers(*word_len)) for _ in range(n_words)]
    follow = [rng.choice(n_words, size=2, replace=False) for _ in range(n_words)]   # each word: 2 successors
    text_rng = np.random.default_rng(seed)
    ids, w = [1], int(text_rng.integers(n_words))
    while len(ids) < n_tokens:
        ids.extend(int(t) for t in words[w])
        w = int(follow[w][text_rng.integers(2)])
    return ids[:n_tokens]


def make_trained_llama(out_dir, vocab=96, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, steps=150,
                       seq_len=64, seed=0):
    """Train a tiny LlamaForCausalLM on pattern_corpus for a few seconds and save it (float32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny matrices: one thread is as fast and immune to a busy machine
    data = torch.tensor(pattern_corpus(seed=99, n_tokens=seq_len * 32, vocab=vocab)).view(32, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = data[torch.randint(0, 32, (8,))]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def rtn_quantize(weight, bits, group_size, sym):
    """Round-to-nearest baseline: W [out, in] -> dequantized W, per output row and group of consecutive inputs,
    min-max grid (asym: scale = (max - min) / maxq; sym: max |w| around the middle code), fp16 scales."""
    out_f, in_f = weight.shape
    g = in_f if group_size == -1 else group_size
    maxq = 2 ** bits - 1
    result = np.empty_like(weight, dtype=np.float64)
    for c0 in range(0, in_f, g):
        w = weight[:, c0:c0 + g].astype(np.float64)                              # [out, g]
        lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)                # [out]
        if sym:
            hi = np.maximum(-lo, hi)
            lo = np.where(lo < 0, -hi, lo)
        both_zero = (lo == 0) & (hi == 0)
        lo, hi = np.where(both_zero, -1, lo), np.where(both_zero, 1, hi)
        scale = ((hi - lo) / maxq).astype(np.float16).astype(np.float64)[:, None]   # [out, 1]
        zero = np.full_like(scale, (maxq + 1) // 2) if sym else np.round(-lo / scale[:, 0])[:, None]
        q = np.clip(np.round(w / scale) + zero, 0, maxq)
        result[:, c0:c0 + g] = scale * (q - zero)
    return result


def perplexity(model, ids):
    """exp(mean negative log-likelihood of each next token) from teacher-forced logits."""
    logits = model.logits(ids).astype(np.float64)                               # [T, V]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return float(np.exp(nll.mean()))
