"""What a GPTQ checkpoint holds besides the values: each linear's tensors, the settings block, the metadata.

Shared by the two writers of GPTQ checkpoints, synth (random values) and quantize (GPTQ on a dense model), so
both write the layout docs/formats.md describes in one way.
"""

from .safetensors_writer import TensorSpec


def gptq_linear_specs(prefix, n_in, n_out, bits, group_size, bias=False):
    """The tensors of one GPTQ linear (docs/formats.md, "Tensors of a GPTQ linear"); bias=True adds the
    all-zero fp16 `.bias` that AutoGPTQ writes for every linear."""
    n_groups = 1 if group_size == -1 else -(-n_in // group_size)
    specs = [TensorSpec(prefix + ".qweight", "I32", (-(-n_in * bits // 32), n_out)),     # column bit streams
             TensorSpec(prefix + ".qzeros", "I32", (n_groups, -(-n_out * bits // 32))),  # row bit streams
             TensorSpec(prefix + ".scales", "F16", (n_groups, n_out)),
             TensorSpec(prefix + ".g_idx", "I32", (n_in,))]
    if bias:
        specs.append(TensorSpec(prefix + ".bias", "F16", (n_out,)))
    return specs


def quantization_block(qc):
    """quantize_config.json (and config.json's quantization_config) as AutoGPTQ writes it, with the keys newer
    writers add, from a quant.QuantConfig."""
    return {"bits": qc.bits, "group_size": qc.group_size, "damp_percent": qc.damp_percent,
            "desc_act": qc.desc_act, "static_groups": False, "sym": qc.sym, "true_sequential": True,
            "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq",
            "checkpoint_format": qc.checkpoint_format}


def safetensors_metadata(qc, **extra):
    """The safetensors `__metadata__` block (strings only): the format tag and, for GPTQ, its settings."""
    meta = {"format": "pt"}
    if qc is not None:
        meta.update({"gptq_bits": str(qc.bits), "gptq_group_size": str(qc.group_size),
                     "gptq_desc_act": str(qc.desc_act), "gptq_sym": str(qc.sym)})
    meta.update({k: str(v) for k, v in extra.items()})
    return meta
