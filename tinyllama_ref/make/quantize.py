"""Quantize a dense Llama checkpoint with GPTQ, one decoder layer at a time, into the AutoGPTQ layout.

    calibration ids -> embedding rows X [N, D]
    for each layer (weights read from the memory map, one layer at a time):
        H(q,k,v)  from rms_norm(X)                    -> quantize q, k, v
        H(o)      from attention with QUANTIZED q,k,v -> quantize o
        H(gate,up) from rms_norm(X + attention)       -> quantize gate, up
        H(down)   from silu(gate(.)) * up(.)          -> quantize down
        X <- the layer's output computed with the QUANTIZED layer, the input of the next layer
        write the layer's packed tensors to the output file and forget them

This is AutoGPTQ's "true sequential" order: every linear is calibrated on the inputs it will really see once
the linears before it are quantized, so errors of earlier sub-layers are compensated rather than compounded.
Memory stays bounded by the calibration activations (X and the attention output, N x D floats each), one
layer's weights, and one Hessian (in x in float64: 6.6 GB for a 70B down_proj).

The output file is written as a stream: every tensor's name, dtype and shape is known from config.json before
anything is quantized, so the safetensors header goes first and each tensor is appended as soon as it exists
(make/safetensors_writer.py, in production order). An interrupted run leaves only OUT/model.safetensors.partial.
Running the same command again into that OUT resumes: the layers the file already holds are not quantized
again, their stored weights are read back and only carry the calibration activations forward, so the result
is byte for byte what an uninterrupted run writes. The header's `calibration_sha256` (settings, calibration
ids, the dense files) tells whether a partial file belongs to this run; one that does not is overwritten.
"""

import hashlib
import json
import os
import sys
from types import SimpleNamespace

import numpy as np

from ..attention import attention
from ..checkpoint import Checkpoint, to_f32
from ..config import load_config, read_json
from ..errors import CheckpointError, QuantError, TinyLlamaError
from ..kvcache import KVCache
from ..ops import rms_norm, rope_tables, silu
from ..progress import Progress
from ..quant import SUPPORTED_BITS, QuantConfig, dequantize, pack_columns, pack_zeros, stored_zeros
from ..tokenizer import Tokenizer
from ..weights import LINEARS, embedding_info
from .files import SMALL_FILES_ALLOWANCE, check_free_space, copy_file, write_json
from .gptq import gptq_quantize, hessian
from .layout import gptq_linear_specs, quantization_block, safetensors_metadata
from .safetensors_writer import SafetensorsWriter, TensorSpec, file_size

PARTIAL = "model.safetensors.partial"     # what an interrupted run leaves in OUT (and nothing else)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
# The order in which a layer's linears are quantized (and written): each stage's inputs depend on the
# quantized outputs of the stages before it.
STAGES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


# -- calibration data ---------------------------------------------------------------------------------------

def read_text(path, what):
    """A whole text file, or a TinyLlamaError naming the file and what it was for."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise TinyLlamaError(f"{path}: cannot read {what} ({e.strerror})") from None


def read_calibration_ids(path):
    """Token id sequences from a file: a JSON list of ints or of lists, or one comma-separated sequence a line."""
    text = read_text(path, "calibration ids")
    try:
        data = json.loads(text)
        seqs = [data] if data and all(isinstance(t, int) for t in data) else data
        seqs = [[int(t) for t in s] for s in seqs]
    except (json.JSONDecodeError, TypeError, ValueError):
        try:
            seqs = [[int(t) for t in line.replace(" ", "").split(",") if t]
                    for line in text.splitlines() if line.strip()]
        except ValueError:
            raise TinyLlamaError(f"{path}: expected a JSON list of token ids (or of lists), or one "
                                 "comma-separated sequence of ids per line") from None
    seqs = [s for s in seqs if s]
    if not seqs:
        raise TinyLlamaError(f"{path}: no token ids found")
    return seqs


def calibration_from_text(path, checkpoint_dir, seq_len, n_samples):
    """Windows of seq_len tokens from a text file, tokenized with the checkpoint's tokenizer, each after BOS."""
    text = read_text(path, "calibration text")
    tok = Tokenizer.from_dir(checkpoint_dir)
    ids = tok.encode(text, add_bos=False)
    if len(ids) < 2:
        raise TinyLlamaError(f"{path}: the calibration text is (nearly) empty; give a few paragraphs of text "
                             "like the model's use")
    body = seq_len - 1
    return [[tok.bos_id] + ids[s:s + body] for s in range(0, len(ids), body)][:n_samples]


def check_calibration(seqs, cfg, seq_len, n_samples):
    """Cut sequences to seq_len (and the model's context), keep n_samples, refuse ids outside the vocabulary."""
    limit = min(seq_len, cfg.max_seq_len)
    out = []
    for s in seqs[:n_samples]:
        s = np.asarray(s[:limit], dtype=np.int64)
        bad = s[(s < 0) | (s >= cfg.vocab_size)]
        if bad.size:
            raise TinyLlamaError(f"calibration token id {int(bad[0])} is outside the vocabulary "
                                 f"(0..{cfg.vocab_size - 1})")
        out.append(s)
    return out


# -- the output layout --------------------------------------------------------------------------------------

def output_plan(ckpt, cfg, bits, group_size):
    """Every output tensor's TensorSpec, in the order quantize_checkpoint produces them."""
    plan = [TensorSpec("model.embed_tokens.weight", "F16", ckpt.info("model.embed_tokens.weight").shape)]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        plan += [TensorSpec(p + "input_layernorm.weight", "F16", (cfg.dim,)),
                 TensorSpec(p + "post_attention_layernorm.weight", "F16", (cfg.dim,))]
        for stage in STAGES:
            for key in stage:
                sub, fin, fout = LINEARS[key]
                plan += gptq_linear_specs(p + sub, fin(cfg), fout(cfg), bits, group_size)
    plan.append(TensorSpec("model.norm.weight", "F16", (cfg.dim,)))
    if "lm_head.weight" in ckpt:
        plan.append(TensorSpec("lm_head.weight", "F16", ckpt.info("lm_head.weight").shape))
    return plan


def as_fp16(ckpt, name):
    """A dense tensor as float16, refusing values float16 cannot hold rather than writing inf."""
    x = ckpt.f32(name)
    if np.abs(x).max(initial=0.0) > 65504:
        raise QuantError(f"{ckpt.info(name).file}: tensor {name} holds {float(np.abs(x).max()):.4g}, beyond "
                         "float16's range; it cannot be stored in a GPTQ (float16) checkpoint")
    return x.astype(np.float16)


# -- one decoder layer, with float32 NumPy weights ----------------------------------------------------------

def attention_heads(xn, Wq, Wk, Wv, cfg, cos, sin, lengths):
    """The engine's attention (attention.py) with o_proj left out, for packed sequences: xn [N, D] -> [N, H * hd].

    o_proj is the identity here because GPTQ needs its input (the Hessian of o). One sequence at a time through
    a one-slot cache, so the keys and values of all calibration sequences never exist at once."""
    w = SimpleNamespace(q=lambda x: x @ Wq.T, k=lambda x: x @ Wk.T, v=lambda x: x @ Wv.T, o=lambda heads: heads)
    cache = KVCache(1, 1, max(lengths), cfg.n_kv_heads, cfg.head_dim)     # [1, T, KV, hd] keys and values
    out = np.empty((xn.shape[0], cfg.n_heads * cfg.head_dim), dtype=np.float32)   # [N, H * hd]
    row = 0
    for n in lengths:
        out[row:row + n] = attention(xn[row:row + n], w, cache, 0, [(0, 0, n)], cfg, cos, sin)   # [n, H * hd]
        row += n
    return out


def rows_of(x, lengths):
    """The rows of x sequence by sequence (Hessians and MLPs are accumulated per sequence to bound memory)."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [x[a:b] for a, b in zip(starts[:-1], starts[1:])]


def output_error(W, Wq, H):
    """||X (W - Wq).T||^2 / ||X W.T||^2 on the calibration inputs, through H = 2/n X.T X."""
    D = W - Wq                                                            # [out, in]
    return float(np.sum((D @ H) * D) / max(np.sum((W @ H) * W), 1e-30))


def quantize_layer(x, lengths, dense, cfg, cos, sin, settings, on_result=None, progress=None, index=0,
                   stored=None):
    """GPTQ for one decoder layer in true-sequential order. x [N, D] is the layer input computed with the
    quantized layers before; returns (layer output [N, D], {key: GPTQResult}, {key: relative output error}).

    stored: {key: quantized weight [out, in] float32} read back from a resumed file. Then nothing is quantized
    (no Hessian either): the layer's output is computed with those weights, and only the norms of `dense` are
    used."""
    results, errors, quantized = {}, {}, {}

    def run_stage(keys, rows):
        if stored is not None:
            quantized.update({key: stored[key] for key in keys})
            return
        H = hessian(rows)
        for key in keys:
            W = dense[key]                                                # [out, in] float32
            r = gptq_quantize(W, H, **settings)
            results[key] = r
            quantized[key] = r.dequantize().astype(np.float32)            # [out, in]
            errors[key] = output_error(W.astype(np.float64), quantized[key].astype(np.float64), H)
            if on_result:
                on_result(index, key, r, W)
            if progress:
                progress.update(len(results), note=key)

    attn_in = rms_norm(x, dense["attn_norm"], cfg.norm_eps)               # [N, D]
    run_stage(("q", "k", "v"), rows_of(attn_in, lengths))
    heads = attention_heads(attn_in, quantized["q"], quantized["k"], quantized["v"], cfg, cos, sin,
                            lengths)                                      # [N, H * hd]
    del attn_in
    run_stage(("o",), rows_of(heads, lengths))
    h = x + heads @ quantized["o"].T                                      # [N, D]
    del heads
    mlp_in = rms_norm(h, dense["ffn_norm"], cfg.norm_eps)                 # [N, D]
    run_stage(("gate", "up"), rows_of(mlp_in, lengths))

    def swiglu(rows):                                                     # [n, D] -> [n, F]
        return silu(rows @ quantized["gate"].T) * (rows @ quantized["up"].T)
    run_stage(("down",), (swiglu(r) for r in rows_of(mlp_in, lengths)))
    out = np.concatenate([h_s + swiglu(m_s) @ quantized["down"].T
                          for h_s, m_s in zip(rows_of(h, lengths), rows_of(mlp_in, lengths))])   # [N, D]
    return out, results, errors


def write_layer(writer, ckpt, i, results, bits, checkpoint_format):
    """Append layer i to the output: its two norms (fp16, from the dense file), then each linear's packed
    tensors in the order output_plan announced."""
    p = f"model.layers.{i}."
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        writer.write(p + norm, as_fp16(ckpt, p + norm))
    for stage in STAGES:
        for key in stage:
            r, name = results[key], p + LINEARS[key][0]
            writer.write(name + ".qweight", pack_columns(r.codes, bits))
            writer.write(name + ".qzeros", pack_zeros(stored_zeros(r.zeros, bits, checkpoint_format), bits))
            writer.write(name + ".scales", r.scales)
            writer.write(name + ".g_idx", r.g_idx)


def read_stored_layer(writer, cfg, i, bits, checkpoint_format):
    """Layer i's quantized linears as float32 [out, in], dequantized from the tensors a resumed file holds
    (the same values GPTQResult.dequantize gave when they were written: fp16 scale x small integer is exact)."""
    p = f"model.layers.{i}."
    stored = {}
    for key, (sub, fin, fout) in LINEARS.items():
        t = {name: writer.read_back(f"{p}{sub}.{name}") for name in ("qweight", "qzeros", "scales", "g_idx")}
        W = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, checkpoint_format)   # [in, out]
        stored[key] = W.T                                                 # [out, in], like the quantized path
    return stored


def read_dense_layer(ckpt, cfg, i):
    """Layer i's dense weights as float32 arrays (HF layout [out, in]) and its two norm weights."""
    p = f"model.layers.{i}."
    dense = {}
    for key, (sub, fin, fout) in LINEARS.items():
        name = f"{p}{sub}.weight"
        info = ckpt.info(name)
        if info.shape != (fout(cfg), fin(cfg)):
            raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected "
                                  f"[{fout(cfg)}, {fin(cfg)}] from config.json")
        dense[key] = np.array(ckpt.f32(name), dtype=np.float32)
    dense["attn_norm"] = np.array(ckpt.f32(p + "input_layernorm.weight"), dtype=np.float32)
    dense["ffn_norm"] = np.array(ckpt.f32(p + "post_attention_layernorm.weight"), dtype=np.float32)
    return dense


# -- the driver ---------------------------------------------------------------------------------------------

def prepare_out_dir(out_dir, dense_dir, nbytes):
    """Create OUT, or accept one that is empty or holds only what an interrupted run left (model.safetensors.
    partial, which the writer resumes or overwrites, and hidden .partial-* files, which are removed). First
    refuse when the disk lacks room for the nbytes of model.safetensors and the small files."""
    if os.path.abspath(out_dir) == os.path.abspath(dense_dir):
        raise TinyLlamaError("OUT must be a new directory, not the dense checkpoint itself")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TinyLlamaError(f"{out_dir}: exists and is not a directory; choose a new output directory")
    left = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    others = [n for n in left if n != PARTIAL and not n.startswith(".partial-")]
    if others:
        raise TinyLlamaError(f"{out_dir}: directory exists and is not empty (it holds {sorted(others)[0]}); "
                             "choose a new output directory")
    reused = os.path.getsize(os.path.join(out_dir, PARTIAL)) if PARTIAL in left else 0   # overwritten in place
    check_free_space(out_dir, nbytes + SMALL_FILES_ALLOWANCE - reused, "use fewer bits or a larger group size")
    os.makedirs(out_dir, exist_ok=True)
    for name in left:
        if name != PARTIAL:
            os.remove(os.path.join(out_dir, name))
    return PARTIAL in left


def run_fingerprint(ckpt, seqs, settings, checkpoint_format):
    """A hash of everything the output depends on: the settings, the calibration ids, and the dense files
    (every tensor's place, each file's size and modification time; not their 140 GB of contents)."""
    dense = [[name, i.dtype, list(i.shape), os.path.basename(i.file), i.start, i.end]
             for name, i in sorted(ckpt.tensors.items())]
    files = [[os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in sorted(ckpt.files)]
    text = json.dumps({"settings": dict(settings, checkpoint_format=checkpoint_format),
                       "calibration": [[int(t) for t in s] for s in seqs], "dense": dense, "files": files})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def layers_held(plan, resumed, n_layers):
    """How many leading decoder layers a resumed file holds completely, and the index in the plan where
    writing must go on (the first tensor of the next layer; the start when no layer is complete)."""
    index = {spec.name: k for k, spec in enumerate(plan)}
    ends = [index[f"model.layers.{i + 1}.input_layernorm.weight"] for i in range(n_layers - 1)]
    ends.append(index["model.norm.weight"])
    held = sum(1 for end in ends if end <= len(resumed))
    return held, (ends[held - 1] if held else 0)


def quantize_checkpoint(dense_dir, out_dir, calibration, bits=4, group_size=128, act_order=True, sym=True,
                        damp_percent=0.01, checkpoint_format="gptq", seq_len=2048, n_samples=128,
                        on_result=None, quiet=True, progress_stream=None):
    """Write a GPTQ checkpoint of dense_dir into out_dir; returns {layer: {linear: relative output error}} for
    the layers quantized by this call (a resumed run reads the others back).

    calibration: token id sequences (lists of ints). on_result(layer, key, GPTQResult, dense W) is called for
    every quantized linear (tests use it to check the file against an independent packer). Unless quiet, a
    progress line per layer goes to progress_stream (stderr), ending as `layer 3/80 [#######] done, ...`.
    """
    if bits not in SUPPORTED_BITS:
        raise QuantError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise QuantError(f"--group-size must be -1 (one group per row) or positive, got {group_size}")
    if not 0 < damp_percent < 1:
        raise QuantError(f"--damp-percent must lie between 0 and 1, got {damp_percent}")
    qc = QuantConfig(bits=bits, group_size=group_size, desc_act=bool(act_order), sym=bool(sym),
                     checkpoint_format=checkpoint_format, damp_percent=damp_percent)
    stored_zeros(0, bits, checkpoint_format)          # refuses an unknown checkpoint_format before any work
    ckpt = Checkpoint(dense_dir)
    if any(n.endswith(".qweight") for n in ckpt.tensors):
        raise QuantError(f"{dense_dir}: this checkpoint is already GPTQ-quantized; quantize a dense one")
    cfg = load_config(dense_dir, vocab_size=embedding_info(ckpt, load_config(dense_dir).dim).shape[0])
    seqs = check_calibration(calibration, cfg, seq_len, n_samples)
    if not seqs:
        raise TinyLlamaError("no calibration sequences")
    settings = dict(bits=bits, group_size=group_size, sym=sym, act_order=act_order, damp_percent=damp_percent)
    metadata = safetensors_metadata(qc, quantized_by="tinyllama-ref quantize",
                                    calibration_sha256=run_fingerprint(ckpt, seqs, settings, checkpoint_format))
    plan = output_plan(ckpt, cfg, bits, group_size)
    partial = os.path.join(out_dir, PARTIAL)
    interrupted = prepare_out_dir(out_dir, dense_dir, file_size(plan, metadata, order="given"))
    log = (lambda text: None) if quiet else (lambda text: (progress_stream or sys.stderr).write(text + "\n"))
    errors = {}
    with SafetensorsWriter(os.path.join(out_dir, "model.safetensors"), plan, metadata, order="given",
                           partial=partial, keep_partial=True, resume=True) as writer:
        held, resume_at = layers_held(plan, writer.resumed, cfg.n_layers)
        writer.rewind(resume_at)
        if held:
            log(f"{out_dir}: resuming an interrupted run: {PARTIAL} holds layers 1-{held} of {cfg.n_layers}, "
                "which are read back, not quantized again")
        elif interrupted:
            log(f"{out_dir}: {PARTIAL} holds no complete layer of this run (or another run's settings or "
                "calibration); starting over")
        if not held:
            writer.write("model.embed_tokens.weight", as_fp16(ckpt, "model.embed_tokens.weight"))
        lengths = [len(s) for s in seqs]
        embed = ckpt.info("model.embed_tokens.weight")
        x = to_f32(ckpt.raw(embed.name)[np.concatenate(seqs)], embed.dtype)   # [N, D] only the rows used
        cos, sin = rope_tables(max(lengths), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor)  # [T, hd]
        for i in range(cfg.n_layers):
            progress = Progress(f"layer {i + 1:>{len(str(cfg.n_layers))}}/{cfg.n_layers}", total=len(LINEARS),
                                enabled=not quiet, unit="linears", stream=progress_stream, width=len(LINEARS))
            if i < held:
                p = f"model.layers.{i}."
                norms = {"attn_norm": ckpt.f32(p + "input_layernorm.weight"),
                         "ffn_norm": ckpt.f32(p + "post_attention_layernorm.weight")}
                x, _, _ = quantize_layer(x, lengths, norms, cfg, cos, sin, settings,
                                         stored=read_stored_layer(writer, cfg, i, bits, checkpoint_format))
                progress.done = len(LINEARS)
                progress.close(f"read back from {PARTIAL}")
                continue
            progress.update(0, note="reading")
            dense = read_dense_layer(ckpt, cfg, i)
            x, results, errors[i] = quantize_layer(x, lengths, dense, cfg, cos, sin, settings, on_result,
                                                   progress, i)
            write_layer(writer, ckpt, i, results, bits, checkpoint_format)
            del dense, results
            progress.close(f"done, worst output error {max(errors[i].values()):.2e}")
        writer.write("model.norm.weight", as_fp16(ckpt, "model.norm.weight"))
        if "lm_head.weight" in ckpt:
            writer.write("lm_head.weight", as_fp16(ckpt, "lm_head.weight"))

    hf = read_json(os.path.join(dense_dir, "config.json"))
    hf["quantization_config"] = quantization_block(qc)
    hf["torch_dtype"] = "float16"
    if "dtype" in hf:
        hf["dtype"] = "float16"
    write_json(os.path.join(out_dir, "config.json"), hf)
    write_json(os.path.join(out_dir, "quantize_config.json"), quantization_block(qc))
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(dense_dir, name)):
            copy_file(os.path.join(dense_dir, name), os.path.join(out_dir, name))
    return errors
