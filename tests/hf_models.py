"""Tiny random Llama checkpoints made by transformers itself, the independent reference for our model."""


import numpy as np

torch = None


def _torch():
    global torch
    if torch is None:
        import torch as t
        torch = t
    return torch


def make_hf_llama(out_dir, dtype="float32", shard_kb=None, seed=0, rope_factor=None, layers=2, vocab=320,
                  hidden=64, heads=8, kv_heads=2, tie=False, max_pos=256):
    """Save a random LlamaForCausalLM (GQA, non-trivial rope_theta and norm weights) with save_pretrained."""
    t = _torch()
    from transformers import LlamaConfig, LlamaForCausalLM
    t.manual_seed(seed)
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3 - 20,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_pos, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  bos_token_id=1, eos_token_id=2)
    rope = {"rope_type": "default", "rope_theta": 5000.0}
    if rope_factor:
        rope = {"rope_type": "linear", "factor": rope_factor, "rope_theta": 5000.0}
    cfg = LlamaConfig(**kwargs, rope_parameters=rope)
    model = LlamaForCausalLM(cfg).eval()
    with t.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * t.randn_like(p))   # not all ones, so a missing norm weight shows
            elif p.dim() == 2:
                p.mul_(4.0)                            # bigger than the default init: the logits vary more
    model = model.to(getattr(t, dtype))
    kw = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    model.save_pretrained(out_dir, **kw)
    return out_dir


def hf_model(path):
    """Load a checkpoint with transformers in float32 (whatever dtype it was saved in)."""
    t = _torch()
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(path, dtype=t.float32).eval()


def hf_logits(model, ids):
    t = _torch()
    with t.no_grad():
        return model(t.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids, n):
    t = _torch()
    with t.no_grad():
        out = model.generate(t.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
