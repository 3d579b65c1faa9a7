"""Every hostile checkpoint gets one clear error at load, before anything is built (validate.py).

Table-driven: each row is one edit of a good tiny synthetic checkpoint (GPTQ 4-bit, dense fp16, dense fp16 in
two shards; built once per session). For each row and checkpoint kind, load() must raise the row's error class
with a message naming the file and the key or tensor, and `tinyllama-ref inspect` on it must print one
`error:` line, no traceback, and exit 1. The CLI runs in fresh processes, several at a time.
"""

import json
import math
import os
import time

import pytest
from click.testing import CliRunner

import tinyllama_ref
from tinyllama_ref.cli import main
from validation_cases import (DOWN, FILE, Q, Case, add_tensor, assert_one_line_error, both, cli, copy_base,
                              del_key, drop_tensor, first_shard_with_fifo, fresh, header_edit, json_edit, make_base,
                              raw_file, read_header, replace_with_dir, replace_with_fifo, reshape, set_entry,
                              set_key, transpose, write_header)
from tinyllama_ref.errors import CheckpointError, ConfigError, QuantError, TokenizerError

C = "config.json"
QC = "quantize_config.json"
INDEX = "model.safetensors.index.json"
NORM0 = "model.layers.0.input_layernorm.weight"
FFN_NORM3 = "model.layers.3.post_attention_layernorm.weight"
EMBED, HEAD, FINAL = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
GPTQ, DENSE, SHARDED = ("gptq",), ("dense",), ("sharded",)
SINGLE = ("gptq", "dense")


# -- config.json values -----------------------------------------------------------------------------------

CONFIG_INTS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings"]
BAD_INTS = {"string": "256", "bool": True, "float": 2.5, "float-integral": 256.0, "negative": -4, "zero": 0,
            "list": [4], "object": {"v": 4}, "huge": 10**12}
CASES = [Case(f"config-{key}-{kind}", set_key(C, key, value), ConfigError, (C, key))
         for key in CONFIG_INTS for kind, value in BAD_INTS.items()]
CASES += [Case(f"config-missing-{key}", del_key(C, key), ConfigError, (C, key))
          for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")]
CASES += [Case(f"config-null-{key}", set_key(C, key, None), ConfigError, (C, key))
          for key in ("hidden_size", "num_hidden_layers")]
BAD_FLOATS = {"string": "1e-5", "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "negative": -1.0, "zero": 0,
              "bool": True, "list": [1.0]}
CASES += [Case(f"config-{key}-{kind}", set_key(C, key, value), ConfigError, (C, key))
          for key in ("rms_norm_eps", "rope_theta") for kind, value in BAD_FLOATS.items()]
CASES += [Case(f"config-tie-{kind}", set_key(C, "tie_word_embeddings", value), ConfigError,
               (C, "tie_word_embeddings"))
          for kind, value in {"string": "false", "int": 1, "list": []}.items()]
CASES += [
    Case("config-rope_scaling-string", set_key(C, "rope_scaling", "linear"), ConfigError, (C, "rope_scaling")),
    Case("config-rope_scaling-list", set_key(C, "rope_scaling", [2.0]), ConfigError, (C, "rope_scaling")),
    Case("config-rope_scaling-no-factor", set_key(C, "rope_scaling", {"type": "linear"}), ConfigError,
         (C, "factor")),
    Case("config-rope_scaling-string-factor", set_key(C, "rope_scaling", {"type": "linear", "factor": "2"}),
         ConfigError, (C, "factor")),
    Case("config-rope_scaling-negative-factor", set_key(C, "rope_scaling", {"type": "linear", "factor": -2}),
         ConfigError, (C, "factor")),
    Case("config-rope_scaling-nan-factor", set_key(C, "rope_scaling", {"type": "linear", "factor": math.nan}),
         ConfigError, (C, "factor")),
    Case("config-rope_scaling-bool-factor", set_key(C, "rope_scaling", {"type": "linear", "factor": True}),
         ConfigError, (C, "factor")),
    Case("config-rope_scaling-yarn", set_key(C, "rope_scaling", {"type": "yarn", "factor": 2.0}), ConfigError,
         (C, "yarn")),
    Case("config-rope_scaling-type-int", set_key(C, "rope_scaling", {"type": 3, "factor": 2.0}), ConfigError,
         (C, "rope_type")),
    Case("config-rope_parameters-list", set_key(C, "rope_parameters", ["linear"]), ConfigError,
         (C, "rope_parameters")),
    Case("config-rope_parameters-theta-string", set_key(C, "rope_parameters", {"rope_theta": "1e4"}),
         ConfigError, (C, "rope_theta")),
    Case("config-model_type", set_key(C, "model_type", "gpt2"), ConfigError, (C, "model_type")),
    Case("config-model_type-int", set_key(C, "model_type", 7), ConfigError, (C, "model_type")),
    Case("config-hidden_act", set_key(C, "hidden_act", "gelu"), ConfigError, (C, "hidden_act")),
    Case("config-attention_bias", set_key(C, "attention_bias", True), ConfigError, (C, "attention_bias")),
    Case("config-attention_bias-string", set_key(C, "attention_bias", "false"), ConfigError,
         (C, "attention_bias")),
    Case("config-bos-string", set_key(C, "bos_token_id", "1"), ConfigError, (C, "bos_token_id")),
    Case("config-bos-negative", set_key(C, "bos_token_id", -1), ConfigError, (C, "bos_token_id")),
    Case("config-bos-float", set_key(C, "bos_token_id", 1.0), ConfigError, (C, "bos_token_id")),
    Case("config-bos-list", set_key(C, "bos_token_id", [1, 2]), ConfigError, (C, "bos_token_id")),
    Case("config-bos-past-embedding", set_key(C, "bos_token_id", 1000), ConfigError, (C, "bos_token_id")),
    Case("config-eos-string", set_key(C, "eos_token_id", "2"), ConfigError, (C, "eos_token_id")),
    Case("config-eos-list-with-string", set_key(C, "eos_token_id", [2, "x"]), ConfigError, (C, "eos_token_id")),
    Case("config-eos-bool", set_key(C, "eos_token_id", False), ConfigError, (C, "eos_token_id")),
    Case("config-eos-past-embedding", set_key(C, "eos_token_id", [2, 5000]), ConfigError, (C, "eos_token_id")),
    Case("config-vocab-string", set_key(C, "vocab_size", "1000"), ConfigError, (C, "vocab_size")),
    # Consistency between values, and with the tensors.
    Case("config-heads-not-multiple-of-kv", set_key(C, "num_key_value_heads", 3), ConfigError,
         (C, "num_key_value_heads")),
    Case("config-kv-heads-more-than-heads", set_key(C, "num_key_value_heads", 16), ConfigError,
         (C, "num_key_value_heads")),
    Case("config-head_dim-odd", set_key(C, "head_dim", 33), ConfigError, (C, "head_dim")),
    Case("config-hidden-not-multiple-of-heads",
         both(del_key(C, "head_dim"), set_key(C, "hidden_size", 250)), ConfigError, (C, "num_attention_heads")),
    Case("config-head_dim-disagrees-with-tensors", set_key(C, "head_dim", 16), ConfigError,
         ("q_proj", "config.json")),
    Case("config-hidden_size-disagrees-with-tensors", set_key(C, "hidden_size", 128), ConfigError,
         (EMBED, "hidden_size")),
    Case("config-intermediate-disagrees-with-tensors", set_key(C, "intermediate_size", 512), ConfigError,
         ("gate_proj", "config.json")),
    Case("config-heads-disagree-with-tensors", set_key(C, "num_attention_heads", 4), ConfigError,
         ("q_proj", "config.json")),
    Case("config-kv-heads-disagree-with-tensors", set_key(C, "num_key_value_heads", 4), ConfigError,
         ("k_proj", "config.json")),
    Case("config-fewer-layers-than-the-file", set_key(C, "num_hidden_layers", 2), ConfigError,
         (C, "num_hidden_layers", "model.layers.2")),
    Case("config-more-layers-than-the-file", set_key(C, "num_hidden_layers", 6), ConfigError,
         (C, "num_hidden_layers", "model.layers.4")),
    Case("config-a-billion-layers", set_key(C, "num_hidden_layers", 10**9), ConfigError,
         (C, "num_hidden_layers", "1000000000")),
    Case("config-untied-without-lm_head", drop_tensor(HEAD), CheckpointError, (HEAD, "tie_word_embeddings")),
    # The file itself.
    Case("config-top-level-list", raw_file(C, b"[1, 2]"), ConfigError, (C, "object")),
    Case("config-top-level-string", raw_file(C, b'"llama"'), ConfigError, (C, "object")),
    Case("config-empty", raw_file(C, b""), ConfigError, (C, "JSON")),
    Case("config-not-json", raw_file(C, b"{hidden_size: 256}"), ConfigError, (C, "JSON")),
    Case("config-not-utf8", raw_file(C, b'{"model_type": "\xff\xfe"}'), ConfigError, (C, "UTF-8")),
    Case("config-duplicate-key", raw_file(C, b'{"hidden_size": 256, "hidden_size": 512}'), ConfigError,
         (C, "hidden_size", "twice")),
    Case("config-deep-nesting", raw_file(C, b"[" * 100000 + b"]" * 100000), ConfigError, (C, "JSON")),
    Case("config-huge-integer", raw_file(C, b'{"hidden_size": ' + b"9" * 5000 + b"}"), ConfigError, (C,)),
    Case("config-missing", lambda d: os.remove(os.path.join(d, C)), ConfigError, (C, "not found")),
    Case("config-is-a-directory", replace_with_dir(C), ConfigError, (C, "directory")),
    Case("config-is-a-fifo", replace_with_fifo(C), ConfigError, (C, "FIFO")),
]

# -- quantization settings (GPTQ) ----------------------------------------------------------------------------

for name in (QC, C):
    def qset(key, value, name=name):
        if name == QC:
            return set_key(QC, key, value)
        return both(lambda d: os.remove(os.path.join(d, QC)),
                    json_edit(C, lambda obj: obj["quantization_config"].__setitem__(key, value)))
    where = QC if name == QC else "quantization_config"
    tag = "qc" if name == QC else "config-qc"
    CASES += [Case(f"{tag}-{key}-{kind}", qset(key, value), ConfigError, (where, key), GPTQ)
              for key, kind, value in [("bits", "string", "4"), ("bits", "bool", True), ("bits", "5", 5),
                                       ("bits", "float", 4.0), ("group_size", "zero", 0),
                                       ("group_size", "string", "32"), ("group_size", "-2", -2),
                                       ("desc_act", "string", "true"), ("sym", "int", 1),
                                       ("checkpoint_format", "marlin", "marlin"),
                                       ("checkpoint_format", "int", 2), ("quant_method", "awq", "awq"),
                                       ("damp_percent", "string", "0.1")]]
CASES += [
    Case("qc-bits-disagree-with-config", set_key(QC, "bits", 8), ConfigError, (QC, "bits"), GPTQ),
    Case("qc-group_size-disagrees-with-config", set_key(QC, "group_size", 64), ConfigError, (QC, "group_size"),
         GPTQ),
    Case("qc-bits-disagree-with-tensors",
         both(set_key(QC, "bits", 3), json_edit(C, lambda o: o["quantization_config"].__setitem__("bits", 3))),
         QuantError, ("qweight", "bits"), GPTQ),
    Case("qc-group_size-disagrees-with-tensors",
         both(set_key(QC, "group_size", 64),
              json_edit(C, lambda o: o["quantization_config"].__setitem__("group_size", 64))),
         QuantError, ("qzeros", "group_size"), GPTQ),
    Case("qc-top-level-list", raw_file(QC, b"[4]"), ConfigError, (QC,), GPTQ),
    Case("qc-is-a-directory", replace_with_dir(QC), ConfigError, (QC, "directory"), GPTQ),
    Case("config-qc-block-list", both(lambda d: os.remove(os.path.join(d, QC)),
                                      set_key(C, "quantization_config", [4])), ConfigError,
         ("quantization_config",), GPTQ),
    Case("gptq-without-any-quant-config", both(lambda d: os.remove(os.path.join(d, QC)),
                                               del_key(C, "quantization_config")), QuantError,
         ("qweight", "quantize_config.json"), GPTQ),
    Case("gptq-metadata-bits-disagree", header_edit(lambda h: h.__setitem__("__metadata__",
                                                                              {"format": "pt", "gptq_bits": "3"})),
         QuantError, ("gptq_bits",), GPTQ),
]

# -- tensors: presence, dtype, shape, leftovers ---------------------------------------------------------------

FLOAT_ROLES = [EMBED, HEAD, FINAL, NORM0, FFN_NORM3]
CASES += [Case(f"missing-{t}", drop_tensor(t), CheckpointError, (t,)) for t in FLOAT_ROLES]
CASES += [Case(f"dtype-I16-{t}", set_entry(t, dtype="I16"), CheckpointError, (t, "I16")) for t in FLOAT_ROLES]
CASES += [Case(f"transposed-{t}", transpose(t), CheckpointError, (t, "shape")) for t in (EMBED, HEAD)]
CASES += [Case(f"shape-{t}", reshape(t, lambda s: [s[0] // 2, 2]), CheckpointError, (t, "shape"))
          for t in (FINAL, NORM0)]
CASES += [Case(f"dense-missing-{sub}", drop_tensor(f"model.layers.1.{sub}.weight"), CheckpointError,
               (f"model.layers.1.{sub}.weight",), DENSE + SHARDED)
          for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
CASES += [
    Case("dense-dtype-I16", set_entry(f"{Q}.weight", dtype="I16"), CheckpointError, (f"{Q}.weight", "I16"),
         DENSE + SHARDED),
    Case("dense-transposed", transpose(f"{DOWN}.weight"), CheckpointError, (f"{DOWN}.weight", "shape"),
         DENSE + SHARDED),
    Case("dense-flattened", reshape(f"{Q}.weight", lambda s: [s[0] * s[1]]), CheckpointError,
         (f"{Q}.weight", "shape"), DENSE + SHARDED),
    Case("dense-bias", add_tensor(f"{Q}.bias", FINAL), CheckpointError, (f"{Q}.bias",), DENSE + SHARDED),
    Case("dense-and-gptq-at-once", add_tensor(f"{Q}.qweight", f"{Q}.weight"), CheckpointError, (Q,),
         DENSE + SHARDED),
]
for part in ("qweight", "qzeros", "scales", "g_idx"):
    CASES += [Case(f"gptq-missing-{part}", drop_tensor(f"{Q}.{part}"), QuantError, (f"{Q}.{part}",), GPTQ)]
CASES += [
    Case("gptq-qweight-F32", set_entry(f"{Q}.qweight", dtype="F32"), QuantError, (f"{Q}.qweight", "F32"), GPTQ),
    Case("gptq-qzeros-F32", set_entry(f"{Q}.qzeros", dtype="F32"), QuantError, (f"{Q}.qzeros", "F32"), GPTQ),
    Case("gptq-g_idx-F32", set_entry(f"{Q}.g_idx", dtype="F32"), QuantError, (f"{Q}.g_idx", "F32"), GPTQ),
    Case("gptq-scales-BF16", set_entry(f"{Q}.scales", dtype="BF16"), QuantError, (f"{Q}.scales", "BF16"), GPTQ),
    Case("gptq-scales-I16", set_entry(f"{DOWN}.scales", dtype="I16"), QuantError, (f"{DOWN}.scales", "I16"),
         GPTQ),
    Case("gptq-qweight-transposed", transpose(f"{Q}.qweight"), QuantError, (f"{Q}.qweight", "shape"), GPTQ),
    Case("gptq-qzeros-transposed", transpose(f"{DOWN}.qzeros"), QuantError, (f"{DOWN}.qzeros", "shape"), GPTQ),
    Case("gptq-scales-transposed", transpose(f"{DOWN}.scales"), QuantError, (f"{DOWN}.scales", "shape"), GPTQ),
    Case("gptq-g_idx-2d", reshape(f"{Q}.g_idx", lambda s: [s[0] // 2, 2]), QuantError, (f"{Q}.g_idx", "shape"),
         GPTQ),
    Case("gptq-dense-weight-beside-qweight", add_tensor(f"{Q}.weight", f"{Q}.scales"), CheckpointError,
         (f"{Q}.weight",), GPTQ),
    Case("gptq-quantized-lm_head", add_tensor("lm_head.qweight", f"{Q}.qweight"), CheckpointError,
         ("lm_head.qweight",), GPTQ),
]
CASES += [
    Case("extra-layer", add_tensor("model.layers.4.input_layernorm.weight", NORM0), ConfigError,
         ("model.layers.4", "num_hidden_layers")),
    Case("extra-unknown-tensor", add_tensor("model.vision_tower.weight", FINAL), CheckpointError,
         ("model.vision_tower.weight",)),
    Case("extra-tensor-in-a-layer", add_tensor("model.layers.0.self_attn.q_norm.weight", NORM0),
         CheckpointError, ("model.layers.0.self_attn.q_norm.weight",)),
    Case("inv_freq-wrong-shape", add_tensor("model.layers.0.self_attn.rotary_emb.inv_freq", NORM0),
         CheckpointError, ("inv_freq", "shape")),
]

# -- the safetensors container ----------------------------------------------------------------------------------

CASES += [
    Case("st-dtype-unknown", set_entry(FINAL, dtype="F17"), CheckpointError, (FINAL, "F17")),
    Case("st-dtype-list", set_entry(FINAL, dtype=["F16"]), CheckpointError, (FINAL, "dtype")),
    Case("st-dtype-null", set_entry(FINAL, dtype=None), CheckpointError, (FINAL, "dtype")),
    Case("st-shape-string", set_entry(FINAL, shape="256"), CheckpointError, (FINAL, "shape")),
    Case("st-shape-negative", set_entry(FINAL, shape=[-256]), CheckpointError, (FINAL, "shape")),
    Case("st-shape-float", set_entry(FINAL, shape=[256.0]), CheckpointError, (FINAL, "shape")),
    Case("st-shape-bool", set_entry(FINAL, shape=[True, 256]), CheckpointError, (FINAL, "shape")),
    Case("st-shape-int64-wraparound", set_entry(FINAL, shape=[2**62 + 64, 4]), CheckpointError,
         (FINAL, "bytes")),
    Case("st-shape-product-wraps-to-the-size", set_entry(FINAL, shape=[2**63, 2**63, 1]), CheckpointError,
         (FINAL, "bytes")),
    Case("st-offsets-reversed", header_edit(lambda h: h[FINAL].__setitem__(
        "data_offsets", h[FINAL]["data_offsets"][::-1]), FINAL), CheckpointError, (FINAL, "data_offsets")),
    Case("st-offsets-negative", set_entry(FINAL, data_offsets=[-512, 0]), CheckpointError,
         (FINAL, "data_offsets")),
    Case("st-offsets-past-the-end", set_entry(FINAL, data_offsets=[10**9, 10**9 + 512]), CheckpointError,
         (FINAL, "data_offsets")),
    Case("st-offsets-strings", set_entry(FINAL, data_offsets=["0", "512"]), CheckpointError,
         (FINAL, "data_offsets")),
    Case("st-offsets-three", set_entry(FINAL, data_offsets=[0, 256, 512]), CheckpointError,
         (FINAL, "data_offsets")),
    Case("st-entry-not-object", header_edit(lambda h: h.__setitem__(FINAL, "F16"), FINAL), CheckpointError,
         (FINAL,)),
    Case("st-overlap", header_edit(lambda h: h[NORM0].__setitem__("data_offsets", h[FFN_NORM3]["data_offsets"])
                                   if h.get(FFN_NORM3) else None, NORM0), CheckpointError, ("overlap",),
         SINGLE),
    Case("st-metadata-list", header_edit(lambda h: h.__setitem__("__metadata__", ["pt"])), CheckpointError,
         ("__metadata__",)),
    Case("st-metadata-string", header_edit(lambda h: h.__setitem__("__metadata__", "pt")), CheckpointError,
         ("__metadata__",)),
    Case("st-metadata-int-value", header_edit(lambda h: h.__setitem__("__metadata__", {"format": 1})),
         CheckpointError, ("__metadata__", "format")),
    Case("st-metadata-null-value", header_edit(lambda h: h.__setitem__("__metadata__", {"format": None})),
         CheckpointError, ("__metadata__", "format")),
    Case("st-metadata-nested", header_edit(lambda h: h.__setitem__("__metadata__", {"format": {"a": "b"}})),
         CheckpointError, ("__metadata__",)),
]


def header_bytes(transform):
    """Replace the first safetensors file's header bytes: transform(raw header bytes, data) -> whole file."""
    def edit(d):
        name = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))[0]
        path = os.path.join(d, name)
        raw = open(path, "rb").read()
        n = int.from_bytes(raw[:8], "little")
        with fresh(path) as f:
            f.write(transform(raw[8:8 + n], raw[8 + n:], raw))
    return edit


def _with(header):
    return lambda h, data, raw: len(header).to_bytes(8, "little") + header + data


CASES += [
    Case("st-header-not-json", header_bytes(lambda h, data, raw: raw[:8] + b"{" + b" " * (len(h) - 1) + data),
         CheckpointError, (".safetensors", "JSON")),
    Case("st-header-list", header_bytes(_with(b"[]")), CheckpointError, (".safetensors", "object")),
    Case("st-header-not-utf8", header_bytes(_with(b'{"\xff": 1}')), CheckpointError, (".safetensors", "UTF-8")),
    Case("st-header-duplicate-tensor", header_bytes(lambda h, data, raw: _with(
        h.rstrip()[:-1] + b"," + h[1:])(h, data, raw)), CheckpointError, (".safetensors", "twice")),
    Case("st-header-deep", header_bytes(_with(b"[" * 50000 + b"]" * 50000)), CheckpointError,
         (".safetensors", "JSON")),
    Case("st-header-length-past-the-end", header_bytes(lambda h, data, raw: (10**6).to_bytes(8, "little") + h),
         CheckpointError, (".safetensors", "past the end")),
    Case("st-header-length-huge", header_bytes(lambda h, data, raw: (2**64 - 1).to_bytes(8, "little") + h + data),
         CheckpointError, (".safetensors", "limit")),
    Case("st-truncated-data", header_bytes(lambda h, data, raw: raw[:8 + len(h) + len(data) // 2]),
         CheckpointError, (".safetensors",)),
    Case("st-empty-file", header_bytes(lambda h, data, raw: b""), CheckpointError, (".safetensors", "0 bytes")),
    Case("st-seven-bytes", header_bytes(lambda h, data, raw: raw[:7]), CheckpointError, (".safetensors",)),
    Case("st-is-a-directory", replace_with_dir(FILE), CheckpointError, (FILE, "directory"), SINGLE),
    Case("st-is-a-fifo", replace_with_fifo(FILE), CheckpointError, (FILE, "FIFO"), SINGLE),
    Case("st-none-at-all", lambda d: os.remove(os.path.join(d, FILE)), CheckpointError, ("safetensors",), SINGLE),
    Case("st-extra-directory-named-safetensors", lambda d: os.mkdir(os.path.join(d, "extra.safetensors")),
         CheckpointError, ("extra.safetensors", "directory"), SINGLE),
]

# -- sharded checkpoints: the index ---------------------------------------------------------------------------


def index_edit(fn):
    return json_edit(INDEX, fn)


def move_in_index(tensor):
    def fn(obj):
        shards = sorted(set(obj["weight_map"].values()))
        here = obj["weight_map"][tensor]
        obj["weight_map"][tensor] = shards[1] if here == shards[0] else shards[0]
    return index_edit(fn)


def duplicate_in_other_shard(d):
    index = os.path.join(d, INDEX)
    m = json.load(open(index))
    shards = sorted(set(m["weight_map"].values()))
    tensor = EMBED if m["weight_map"][EMBED] == shards[0] else FINAL
    other = shards[1] if m["weight_map"][tensor] == shards[0] else shards[0]
    # copy the tensor's entry and bytes into the other shard
    src_h, src_d = read_header(os.path.join(d, m["weight_map"][tensor]))
    dst_h, dst_d = read_header(os.path.join(d, other))
    entry = dict(src_h[tensor])
    b, e = entry["data_offsets"]
    entry["data_offsets"] = [len(dst_d), len(dst_d) + e - b]
    dst_h[tensor] = entry
    write_header(os.path.join(d, other), dst_h, dst_d + src_d[b:e])


CASES += [
    Case("index-is-a-directory", replace_with_dir(INDEX), CheckpointError, (INDEX, "directory"), SHARDED),
    Case("index-is-a-fifo", replace_with_fifo(INDEX), CheckpointError, (INDEX, "FIFO"), SHARDED),
    Case("index-not-json", raw_file(INDEX, b"{weight_map"), CheckpointError, (INDEX, "JSON"), SHARDED),
    Case("index-list", raw_file(INDEX, b"[]"), CheckpointError, (INDEX, "object"), SHARDED),
    Case("index-no-weight_map", index_edit(lambda o: o.pop("weight_map") and None), CheckpointError,
         (INDEX, "weight_map"), SHARDED),
    Case("index-weight_map-list", set_key(INDEX, "weight_map", ["model-00001-of-00002.safetensors"]),
         CheckpointError, (INDEX, "weight_map"), SHARDED),
    Case("index-shard-int", index_edit(lambda o: o["weight_map"].__setitem__(FINAL, 1)), CheckpointError,
         (INDEX, FINAL), SHARDED),
    Case("index-shard-escapes", index_edit(lambda o: o["weight_map"].__setitem__(FINAL, "../x.safetensors")),
         CheckpointError, (INDEX, FINAL), SHARDED),
    Case("index-shard-missing", index_edit(lambda o: o["weight_map"].__setitem__(FINAL, "gone.safetensors")),
         CheckpointError, ("gone.safetensors", "not found"), SHARDED),
    Case("index-shard-is-a-directory", both(lambda d: os.mkdir(os.path.join(d, "dir.safetensors")),
                                            index_edit(lambda o: o["weight_map"].__setitem__(
                                                FINAL, "dir.safetensors"))),
         CheckpointError, ("dir.safetensors", "directory"), SHARDED),
    Case("index-shard-is-a-fifo", first_shard_with_fifo, CheckpointError, ("FIFO",), SHARDED),
    Case("index-tensor-in-the-wrong-shard", move_in_index(FINAL), CheckpointError, (INDEX, FINAL), SHARDED),
    Case("index-lists-a-missing-tensor", index_edit(lambda o: o["weight_map"].__setitem__(
        "model.layers.0.extra.weight", o["weight_map"][FINAL])), CheckpointError, (INDEX, "in no shard"), SHARDED),
    Case("index-omits-a-tensor", index_edit(lambda o: o["weight_map"].pop(FINAL) and None), CheckpointError,
         (INDEX, FINAL), SHARDED),
    Case("index-duplicate-key", lambda d: raw_file(INDEX, open(os.path.join(d, INDEX), "rb").read().replace(
        b'"weight_map": {', b'"weight_map": {"%s": "x", ' % FINAL.encode(), 1))(d),
         CheckpointError, (INDEX, "twice"), SHARDED),
    Case("shards-duplicate-tensor", duplicate_in_other_shard, CheckpointError, ("also appears",), SHARDED),
]

# -- tokenizer and generation files (checked at load, since the first forward pass may need them) -----------

TC, AT, SM, GC = "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json", "generation_config.json"


def decoder_edit(fn):
    return json_edit(TC, lambda o: fn(o["added_tokens_decoder"]))


CASES += [
    Case("tc-list", raw_file(TC, b"[]"), TokenizerError, (TC, "object")),
    Case("tc-not-json", raw_file(TC, b"{"), TokenizerError, (TC, "JSON")),
    Case("tc-is-a-directory", replace_with_dir(TC), TokenizerError, (TC, "directory")),
    Case("tc-decoder-list", set_key(TC, "added_tokens_decoder", [{"content": "<s>"}]), TokenizerError,
         (TC, "added_tokens_decoder")),
    Case("tc-decoder-entry-no-content", decoder_edit(lambda d: d["1000"].pop("content") and None),
         TokenizerError, (TC, "added_tokens_decoder", "1000", "content")),
    Case("tc-decoder-entry-content-int", decoder_edit(lambda d: d["1000"].__setitem__("content", 5)),
         TokenizerError, (TC, "1000", "content")),
    Case("tc-decoder-entry-string", decoder_edit(lambda d: d.__setitem__("1000", "<|im_start|>")),
         TokenizerError, (TC, "1000")),
    Case("tc-decoder-key-not-int", decoder_edit(lambda d: d.__setitem__("abc", {"content": "<x>"})),
         TokenizerError, (TC, "abc")),
    Case("tc-decoder-key-negative", decoder_edit(lambda d: d.__setitem__("-5", {"content": "<x>"})),
         TokenizerError, (TC, "-5")),
    Case("tc-decoder-special-string", decoder_edit(lambda d: d["1000"].__setitem__("special", "yes")),
         TokenizerError, (TC, "1000", "special")),
    Case("tc-bos-int", set_key(TC, "bos_token", 1), TokenizerError, (TC, "bos_token")),
    Case("tc-eos-object-without-content", set_key(TC, "eos_token", {"text": "</s>"}), TokenizerError,
         (TC, "eos_token", "content")),
    Case("tc-legacy-string", set_key(TC, "legacy", "false"), TokenizerError, (TC, "legacy")),
    Case("tc-chat_template-int", set_key(TC, "chat_template", 5), TokenizerError, (TC, "chat_template")),
    Case("tc-chat_template-list-of-strings", set_key(TC, "chat_template", ["{{ x }}"]), TokenizerError,
         (TC, "chat_template")),
    Case("at-list", raw_file(AT, b'["<|im_start|>"]'), TokenizerError, (AT, "object")),
    Case("at-id-string", set_key(AT, "<|im_start|>", "1000"), TokenizerError, (AT, "<|im_start|>")),
    Case("at-id-float", set_key(AT, "<|im_start|>", 1000.5), TokenizerError, (AT, "<|im_start|>")),
    Case("at-id-negative", set_key(AT, "<|im_start|>", -1), TokenizerError, (AT, "<|im_start|>")),
    Case("at-id-bool", set_key(AT, "<x>", True), TokenizerError, (AT, "<x>")),
    Case("at-id-null", set_key(AT, "<x>", None), TokenizerError, (AT, "<x>")),
    Case("at-is-a-directory", replace_with_dir(AT), TokenizerError, (AT, "directory")),
    Case("sm-list", raw_file(SM, b"[]"), TokenizerError, (SM, "object")),
    Case("sm-bos-int", set_key(SM, "bos_token", 1), TokenizerError, (SM, "bos_token")),
    Case("sm-bos-object-content-int", set_key(SM, "bos_token", {"content": 1}), TokenizerError,
         (SM, "bos_token", "content")),
    Case("sm-additional-string", set_key(SM, "additional_special_tokens", "<|im_start|>"), TokenizerError,
         (SM, "additional_special_tokens")),
    Case("sm-additional-int", set_key(SM, "additional_special_tokens", [5]), TokenizerError,
         (SM, "additional_special_tokens")),
    Case("sm-additional-object-without-content", set_key(SM, "additional_special_tokens", [{"id": 5}]),
         TokenizerError, (SM, "additional_special_tokens", "content")),
    Case("gc-list", raw_file(GC, b"[]"), ConfigError, (GC, "object")),
    Case("gc-not-json", raw_file(GC, b"{do_sample"), ConfigError, (GC, "JSON")),
    Case("gc-is-a-directory", replace_with_dir(GC), ConfigError, (GC, "directory")),
    Case("gc-temperature-string", set_key(GC, "temperature", "hot"), ConfigError, (GC, "temperature")),
    Case("gc-temperature-nan", set_key(GC, "temperature", math.nan), ConfigError, (GC, "temperature")),
    Case("gc-temperature-negative", set_key(GC, "temperature", -1), ConfigError, (GC, "temperature")),
    Case("gc-top_k-float", set_key(GC, "top_k", 2.5), ConfigError, (GC, "top_k")),
    Case("gc-top_k-string", set_key(GC, "top_k", "50"), ConfigError, (GC, "top_k")),
    Case("gc-top_p-above-one", set_key(GC, "top_p", 5), ConfigError, (GC, "top_p")),
    Case("gc-top_p-list", set_key(GC, "top_p", [0.9]), ConfigError, (GC, "top_p")),
    Case("gc-repetition_penalty-zero", set_key(GC, "repetition_penalty", 0), ConfigError,
         (GC, "repetition_penalty")),
    Case("gc-do_sample-string", set_key(GC, "do_sample", "true"), ConfigError, (GC, "do_sample")),
    Case("gc-do_sample-int", set_key(GC, "do_sample", 1), ConfigError, (GC, "do_sample")),
    Case("gc-eos-string", set_key(GC, "eos_token_id", "2"), ConfigError, (GC, "eos_token_id")),
    Case("gc-eos-list-with-string", set_key(GC, "eos_token_id", [2, "3"]), ConfigError, (GC, "eos_token_id")),
    Case("gc-bos-negative", set_key(GC, "bos_token_id", -1), ConfigError, (GC, "bos_token_id")),
    Case("tokenizer-model-is-a-directory", replace_with_dir("tokenizer.model"), TokenizerError,
         ("tokenizer.model", "directory")),
    Case("tokenizer-model-is-a-fifo", replace_with_fifo("tokenizer.model"), TokenizerError,
         ("tokenizer.model", "FIFO")),
]

ROWS = [(c, kind) for c in CASES for kind in c.kinds]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation_bases")
    return {kind: make_base(kind, str(root / kind)) for kind in ("gptq", "dense", "sharded")}


@pytest.fixture(scope="module")
def broken(bases, tmp_path_factory):
    """Every row's edited checkpoint, made once."""
    root = tmp_path_factory.mktemp("validation_rows")
    dirs = {}
    for case, kind in ROWS:
        d = copy_base(bases[kind], str(root / f"{case.id}-{kind}"))
        case.edit(d)
        dirs[case.id, kind] = d
    return dirs


def test_the_bases_load(bases):
    for kind, d in bases.items():
        m = tinyllama_ref.load(d, backend="numpy")
        assert m.cfg.n_layers == 4 and len(m.generate([1, 5, 6], max_new_tokens=2)) == 2


def run_inspect(d):
    """`tinyllama-ref inspect` in this process (click's runner): its exit code, stderr, and any exception that
    escaped the CLI (which a user would see as a traceback)."""
    r = CliRunner().invoke(main, ["inspect", d])
    escaped = r.exception if not isinstance(r.exception, SystemExit) else None
    return r.exit_code, r.stderr, escaped


@pytest.mark.parametrize("case, kind", ROWS, ids=[f"{c.id}-{k}" for c, k in ROWS])
def test_hostile_checkpoint_is_one_clear_error(case, kind, broken):
    d = broken[case.id, kind]
    t = time.perf_counter()
    with pytest.raises(case.error) as e:
        model = tinyllama_ref.load(d, backend="numpy")
        model.tokenizer                                  # the tokenizer files are part of the checkpoint too
    assert time.perf_counter() - t < 5
    message = str(e.value)
    for needle in case.needles:
        assert needle in message, (needle, message)
    code, stderr, escaped = run_inspect(d)
    assert escaped is None, repr(escaped)
    assert code == 1 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [f"error: {message}"]


# One row of each family again in a real process, as a user runs it: exit 1, one line, no traceback.
SAMPLE = ["config-num_hidden_layers-string", "config-a-billion-layers", "config-rms_norm_eps-nan",
          "config-is-a-fifo", "qc-bits-disagree-with-tensors", "gptq-qweight-F32", "missing-lm_head.weight",
          "extra-layer", "st-shape-int64-wraparound", "st-metadata-int-value", "st-header-deep",
          "st-is-a-fifo", "index-is-a-directory", "index-shard-is-a-fifo", "tc-decoder-entry-no-content",
          "at-id-string", "sm-additional-int", "gc-top_k-string", "tokenizer-model-is-a-fifo"]
SAMPLE_ROWS = [(c, k) for c, k in ROWS if c.id in SAMPLE and k == [k2 for c2, k2 in ROWS if c2.id == c.id][0]]


def test_the_sample_covers_every_family():
    assert len(SAMPLE_ROWS) == len(SAMPLE)


@pytest.mark.parametrize("case, kind", SAMPLE_ROWS, ids=[f"{c.id}-{k}" for c, k in SAMPLE_ROWS])
def test_hostile_checkpoint_in_a_real_process(case, kind, broken):
    p = cli("inspect", broken[case.id, kind], timeout=60)
    assert_one_line_error(p, case.needles)
    assert len(p.stderr.strip().splitlines()) == 1
