"""Tiny GPTQ Llama checkpoints in TheBloke's exact layout, with the transformers model they stand for.

Each linear gets random integer codes, scales and zeros (tests/gptq_packer.py, written from docs/formats.md);
the reference is a transformers LlamaForCausalLM whose Linear weights are the dequantized matrices computed
here from the codes, not by the code under test.
"""


import numpy as np

from gptq_packer import make_layer, quantize_config, write_gptq_checkpoint

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def make_gptq_llama(out_dir, bits=4, group_size=32, act_order=True, sym=True, checkpoint_format="gptq",
                    layers=3, hidden=64, heads=8, kv_heads=2, inter=160, vocab=320, seed=0):
    """Write the checkpoint to out_dir; return the float32 transformers model it is equivalent to."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    model = LlamaForCausalLM(cfg).eval()
    tensors = {}
    sd = model.state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                continue
            if "norm" in name:
                value = (1.0 + 0.2 * rng.standard_normal(p.shape)).astype(np.float16)
            else:                                       # embedding, lm_head: fp16 in GPTQ files
                value = (0.5 * rng.standard_normal(p.shape)).astype(np.float16)
            tensors[name] = value
            p.copy_(torch.from_numpy(value.astype(np.float32)))
        for i in range(layers):
            for sub in LINEARS:
                prefix = f"model.layers.{i}.{sub}"
                lin = dict(model.named_modules())[prefix]
                n_out, n_in = lin.weight.shape
                q = make_layer(rng, n_in, n_out, bits, group_size, act_order=act_order, sym=sym,
                               checkpoint_format=checkpoint_format, bias=True)
                for t in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                    tensors[f"{prefix}.{t}"] = q[t]
                lin.weight.copy_(torch.from_numpy(q["W"].T.copy()))          # HF Linear: [out, in]
                # TheBloke files carry an fp16 bias per linear; the transformers Llama has none, so the
                # bias is applied on the reference side through a forward hook below.
                lin.register_forward_hook(_bias_hook(torch.from_numpy(q["bias"].astype(np.float32))))
    del sd
    qc = quantize_config(bits, group_size, act_order, sym, checkpoint_format)
    write_gptq_checkpoint(out_dir, tensors, cfg.to_dict(), qc)
    return model


def _bias_hook(bias):
    def hook(module, inputs, output):
        return output + bias
    return hook
