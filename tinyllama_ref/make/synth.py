"""Synthetic checkpoints: random but well-behaved weights in the exact layout of TheBloke's GPTQ files.

Why: the real Meditron-70B GPTQ download is 35-41 GB per branch. To test the loader, the kernels and the
memory streamer at full 70B shape we write files with the same names, shapes, dtypes, packing and JSON files
(docs/formats.md), filled with seeded random values: the full 70B 4-bit file took under 5 minutes here,
limited by the disk, instead of a day of downloading.

How the file is written: the list of tensors (name, dtype, shape) is computed first, which fixes every byte
offset and the exact file size; free disk space is checked against that size before anything is created;
then each tensor is generated and written in slabs of about 64 MB (safetensors_writer.py), so memory stays
flat whether the model is 1 MB or 36 GB.

What "well-behaved" means here, and how it is arranged:
  - Codes are uniform over [0, 2**bits) except that code 0 (the most negative value) is replaced by the zero
    point. Plain uniform codes have mean -1/2 around the zero point, which makes every weight matrix carry a
    rank-one "all ones" component; layer after layer that component takes over the residual stream until
    every position holds the same vector (measured: the logits of different tokens correlate 0.999 after 32
    tiny layers, see tests/test_synth.py). With code 0 moved to the zero point the values are symmetric,
    {-(2**(bits-1) - 1) .. 2**(bits-1) - 1}, and the correlation stays near 0.7.
  - Scales (fp16, positive) make each dequantized weight's std GAIN / sqrt(in_features), so a layer roughly
    preserves the size of its input and the residual stream grows slowly (measured on the full 70B file:
    rms 1.2 after layer 0, 6.5 after layer 80, logits std 1.0).
  - Norm weights 1 + 0.05 * noise, embedding rows std 1, lm_head std 1 / sqrt(dim): logits of order 1.
    (Float tensors are drawn uniform with these means and stds; dense linears get std GAIN / sqrt(in).)
Each tensor has its own random stream seeded by (seed, tensor name), so a tensor's values do not depend on
how many layers or shards were asked for.
"""

import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import replace
from functools import lru_cache

import numpy as np

from ..config import preset as get_preset
from ..errors import CheckpointError, ConfigError
from ..progress import Progress
from ..quant import CHECKPOINT_FORMATS, SUPPORTED_BITS, QuantConfig, pack_zeros, stored_zeros
from ..weights import LINEARS
from .files import SMALL_FILES_ALLOWANCE, check_free_space, write_json
from .layout import gptq_linear_specs, quantization_block, safetensors_metadata
from .safetensors_writer import SafetensorsWriter, TensorSpec, file_size
from .tokenizer_files import write_tokenizer_files

GAIN = 0.8                         # std of a dequantized weight times sqrt(in_features)
CHUNK_BYTES = 64 * 1024 * 1024     # generate and write tensors in slabs of about this size
DENSE_DTYPES = {"fp16": "F16", "bf16": "BF16"}
TORCH_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16"}
LLAMA_SENTENCEPIECE_VOCAB = 32000  # Llama-2's tokenizer.model; Meditron's extra embedding rows have no piece


# -- random values -------------------------------------------------------------------------------------------

def tensor_rng(seed, name):
    """A generator for one tensor, seeded by (seed, name) so values do not depend on the write order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def row_slabs(shape, itemsize, chunk_bytes=CHUNK_BYTES):
    """(start, stop) row ranges of about chunk_bytes each, covering the first axis of `shape`."""
    rows = shape[0]
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    step = max(1, chunk_bytes // row_bytes)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def f32_to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def float_slabs(spec, rng, mean, std, chunk_bytes=CHUNK_BYTES):
    """Values of the given mean and std in the spec's float dtype, a slab of rows at a time.

    Uniform rather than normal (as torch.nn.Linear's default init is): NumPy draws uniform float32 about 7x
    faster than normal ones, which decides how long a dense 7B checkpoint takes to write."""
    half_width = np.float32(std * np.sqrt(3.0))          # uniform on [-a, a] has std a / sqrt(3)
    for r0, r1 in row_slabs(spec.shape, 4, chunk_bytes):
        x = rng.random((r1 - r0,) + tuple(spec.shape[1:]), dtype=np.float32)            # [rows, ...] in [0, 1)
        x -= np.float32(0.5)
        x *= 2 * half_width
        x += np.float32(mean)
        yield f32_to_bf16_bits(x) if spec.dtype == "BF16" else x.astype(np.float16)


def zero_slabs(spec):
    dtype = np.uint16 if spec.dtype == "BF16" else np.float16
    for r0, r1 in row_slabs(spec.shape, 2):
        yield np.zeros((r1 - r0,) + tuple(spec.shape[1:]), dtype=dtype)


def code_std(bits):
    """Std of (code - zero point) when codes are uniform but code 0 is moved to the zero point:
    values -(h-1)..(h-1) once each and 0 twice, out of 2**bits, with h = 2**(bits-1)."""
    h = 1 << (bits - 1)
    return float(np.sqrt(2 * sum(k * k for k in range(1, h)) / (1 << bits)))


def fix_zero_codes(blocks, bits):
    """Move every code 0 to the zero point 2**(bits-1), in place, in packed words without unpacking them.

    blocks: uint32 [k, W, out], each [:, :, j] one whole block of a column's bit stream: W = bits / gcd(32,
    bits) words holding 32 / gcd(32, bits) codes (1 word of 8 codes for 4 bits; 3 words of 32 codes for 3).
    A field that lies inside one word is tested bit-parallel: OR-ing the word with itself shifted right by
    1 .. bits-1 gathers each field's bits at the field's lowest bit, so a 0 there means code 0, and the
    field's top bit is then set. The few fields that straddle two words (3 bits: codes 10 and 21) are read
    and fixed one by one."""
    n_words = blocks.shape[1]
    mask = (1 << bits) - 1
    inside = [[] for _ in range(n_words)]     # per word: bit offsets of the fields that lie wholly in it
    straddle = []                             # (word, offset) of fields that continue into the next word
    for t in range(32 * n_words // bits):
        w, off = divmod(t * bits, 32)
        if off + bits <= 32:
            inside[w].append(off)
        else:
            straddle.append((w, off))
    for w, offsets in enumerate(inside):
        words = blocks[:, w]                                                  # [k, out] view
        lsb = np.uint32(sum(1 << off for off in offsets))
        any_bit = words.copy()
        for s in range(1, bits):
            any_bit |= words >> np.uint32(s)
        empty = ~any_bit & lsb                                                # lowest bit of each zero field
        words |= empty << np.uint32(bits - 1)
    for w, off in straddle:
        low_bits = 32 - off
        value = (blocks[:, w] >> np.uint32(off)) | (blocks[:, w + 1] << np.uint32(low_bits))
        empty = ((value & np.uint32(mask)) == 0).astype(np.uint32)            # [k, out] 1 where code 0
        blocks[:, w + 1] |= empty << np.uint32(bits - 1 - low_bits)           # the top bit is in word w + 1
    return blocks


def qweight_slabs(spec, rng, bits, n_in, chunk_bytes=CHUNK_BYTES):
    """Packed random codes [ceil(n_in * bits / 32), out] int32, column bit streams as in docs/formats.md.

    Uniform random 32-bit words ARE uniform codes for any bit width (straddling fields included), so the
    words are drawn directly and only code 0 is fixed up (fix_zero_codes): no unpacking or packing, a few
    hundred MB/s even for 3 bits. Slabs hold whole blocks of words so no field is cut between slabs."""
    n_rows, n_out = spec.shape
    block = bits // np.gcd(32, bits)                     # words per block of whole codes (3 for 3 bits)
    step = max(block, chunk_bytes // (4 * n_out) // block * block)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        padded = -(-(r1 - r0) // block) * block
        words = rng.integers(0, 1 << 32, size=(padded, n_out), dtype=np.uint32)       # [rows, out]
        fix_zero_codes(words.reshape(padded // block, block, n_out), bits)
        words = words[:r1 - r0]
        used = n_in * bits - (n_rows - 1) * 32           # bits of the stream in its last word
        if r1 == n_rows and used < 32:
            # The last word is only partly used: its padding bits are zero, as a packer leaves them.
            words[-1] &= np.uint32((1 << used) - 1)
        yield words.view(np.int32)


@lru_cache(maxsize=32)
def constant_qzeros_row(n_out, bits, stored_zero):
    """One packed qzeros row [1, ceil(out * bits / 32)] holding the same stored zero for every column."""
    return pack_zeros(np.full((1, n_out), stored_zero, dtype=np.int64), bits)


def qzeros_slabs(spec, rng, qc, n_out):
    """Packed stored zeros [G, ceil(out * bits / 32)]: each row one bit stream (docs/formats.md)."""
    half = 1 << (qc.bits - 1)
    if qc.sym:
        # Symmetric GPTQ: every zero point is 2**(bits-1); pack one row and repeat it.
        row = constant_qzeros_row(n_out, qc.bits, int(stored_zeros(half, qc.bits, qc.checkpoint_format)))
        for r0, r1 in row_slabs(spec.shape, 4):
            yield np.repeat(row, r1 - r0, axis=0)
        return
    # Asymmetric: zero points near the middle that differ by group and column, as in real asym files.
    for r0, r1 in row_slabs(spec.shape, 4):
        true_zero = half + rng.integers(-1, 2, size=(r1 - r0, n_out))                    # [groups, out]
        yield pack_zeros(stored_zeros(true_zero, qc.bits, qc.checkpoint_format), qc.bits)


def scales_slabs(spec, rng, bits, n_in):
    """Positive fp16 scales [G, out] giving dequantized weights of std about GAIN / sqrt(in)."""
    base = GAIN / (np.sqrt(n_in) * code_std(bits))
    for r0, r1 in row_slabs(spec.shape, 4):
        noise = rng.standard_normal((r1 - r0, spec.shape[1]), dtype=np.float32)          # [groups, out]
        yield (base * np.exp(0.1 * noise)).astype(np.float16)


def g_idx_values(rng, n_in, qc):
    """The group of each input row. With act-order GPTQ formed groups along a permuted visiting order, so
    g_idx is a permutation of the plain pattern arange(in) // group_size (non-monotonic, like real desc_act
    files); without groups (group_size -1) every row is in group 0."""
    if qc.group_size == -1:
        return np.zeros(n_in, dtype=np.int32)
    pattern = (np.arange(n_in) // qc.group_size).astype(np.int32)                        # [in]
    return rng.permutation(pattern) if qc.desc_act else pattern


# -- the list of tensors -------------------------------------------------------------------------------------

class Planned:
    """One tensor to write: its spec, and a function rng -> iterator of row slabs with its values."""

    def __init__(self, spec, make):
        self.spec = spec
        self.make = make


def linear_plan(prefix, n_in, n_out, qc, float_dtype):
    """The tensors of one linear layer: dense `.weight` [out, in], or the five GPTQ tensors."""
    if qc is None:
        spec = TensorSpec(prefix + ".weight", float_dtype, (n_out, n_in))
        return [Planned(spec, lambda rng, s=spec: float_slabs(s, rng, 0.0, GAIN / np.sqrt(n_in)))]
    bits = qc.bits
    # AutoGPTQ stores zero biases for every linear
    qweight, qzeros, scales, g_idx, bias = gptq_linear_specs(prefix, n_in, n_out, bits, qc.group_size, bias=True)
    return [
        Planned(qweight, lambda rng: qweight_slabs(qweight, rng, bits, n_in)),
        Planned(qzeros, lambda rng: qzeros_slabs(qzeros, rng, qc, n_out)),
        Planned(scales, lambda rng: scales_slabs(scales, rng, bits, n_in)),
        Planned(g_idx, lambda rng: iter([g_idx_values(rng, n_in, qc)])),
        Planned(bias, lambda rng: zero_slabs(bias)),
    ]


def model_plan(cfg, qc, float_dtype):
    """Every tensor of the checkpoint in model order (embedding, layers, final norm, lm_head)."""
    def dense(name, shape, mean, std):
        spec = TensorSpec(name, float_dtype, shape)
        return Planned(spec, lambda rng: float_slabs(spec, rng, mean, std))

    plan = [dense("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim), 0.0, 1.0)]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        plan.append(dense(p + "input_layernorm.weight", (cfg.dim,), 1.0, 0.05))
        for key, (sub, fin, fout) in LINEARS.items():
            if key == "gate":
                plan.append(dense(p + "post_attention_layernorm.weight", (cfg.dim,), 1.0, 0.05))
            plan += linear_plan(p + sub, fin(cfg), fout(cfg), qc, float_dtype)
    plan.append(dense("model.norm.weight", (cfg.dim,), 1.0, 0.05))
    plan.append(dense("lm_head.weight", (cfg.vocab_size, cfg.dim), 0.0, 1.0 / np.sqrt(cfg.dim)))
    return plan


def split_shards(plan, n):
    """Cut the plan (in model order) into n contiguous, non-empty parts of about equal bytes, as
    save_pretrained does: whole tensors only, so a layer's tensors usually share a file."""
    if not 1 <= n <= len(plan):
        raise ConfigError(f"--shards {n}: must be between 1 and the number of tensors ({len(plan)})")
    total = sum(p.spec.nbytes for p in plan)
    parts, k, done = [[] for _ in range(n)], 0, 0
    for i, p in enumerate(plan):
        left = len(plan) - i                           # tensors still to place, this one included
        if parts[k] and k < n - 1 and (done >= total * (k + 1) / n or left <= n - 1 - k):
            k += 1
        parts[k].append(p)
        done += p.spec.nbytes
    return parts


def shard_names(n):
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


# -- the small files -----------------------------------------------------------------------------------------

def config_json(cfg, qc, float_dtype):
    hf = cfg.to_hf()
    hf.update({"torch_dtype": TORCH_DTYPE_NAMES[float_dtype], "pretraining_tp": 1, "use_cache": True,
               "initializer_range": 0.02})
    if qc is not None:
        hf["quantization_config"] = quantization_block(qc)
    return hf


# Greedy by default (do_sample false), so the README's first command prints the same text every run;
# --temperature / --seed turn sampling on.
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False,
                     "max_length": 4096}


# -- disk space ----------------------------------------------------------------------------------------------

# -- the writer ----------------------------------------------------------------------------------------------

def write_shard(path, parts, metadata, seed, progress, done_before):
    """Write one safetensors file, generating each tensor's values slab by slab in header order."""
    by_name = {p.spec.name: p for p in parts}
    progress.label = f"synth: {os.path.basename(path)}"
    with SafetensorsWriter(path, [p.spec for p in parts], metadata) as w:
        for spec in w.order:
            for slab in by_name[spec.name].make(tensor_rng(seed, spec.name)):
                w.write(spec.name, slab)
                progress.update(done_before + w.bytes_done)
    return w.bytes_done


def _validate(preset, bits, group_size, dense_dtype, checkpoint_format, layers, shards):
    cfg = get_preset(preset)
    if layers is not None:
        if not isinstance(layers, int) or layers < 1:
            raise ConfigError(f"--layers must be a positive number of layers, got {layers!r}")
        cfg = replace(cfg, n_layers=layers)
    if dense_dtype is not None and dense_dtype not in DENSE_DTYPES:
        raise ConfigError(f"--dense {dense_dtype!r}: choose one of {', '.join(DENSE_DTYPES)}")
    if dense_dtype is None:
        if bits not in SUPPORTED_BITS:
            raise ConfigError(f"--bits {bits}: GPTQ checkpoints here hold {', '.join(map(str, SUPPORTED_BITS))}"
                              " bits")
        if group_size != -1 and group_size <= 0:
            raise ConfigError(f"--group-size {group_size}: use -1 (one group) or a positive number of inputs")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ConfigError(f"checkpoint_format {checkpoint_format!r}: choose one of "
                              f"{', '.join(CHECKPOINT_FORMATS)}")
    if not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"--shards must be a positive integer, got {shards!r}")
    return cfg


def synthesize(out_dir, preset="tiny", bits=4, group_size=128, act_order=True, sym=True, dense_dtype=None,
               shards=1, seed=0, checkpoint_format="gptq", layers=None, quiet=False, progress_stream=None,
               exist_ok=False):
    """Write a synthetic checkpoint into out_dir (new or empty) and return a summary dict.

    preset: a name from config.PRESETS; layers overrides its layer count (e.g. the 70B shape with 1 layer).
    bits / group_size / act_order / sym / checkpoint_format: the GPTQ settings (ignored with dense_dtype).
    dense_dtype: "fp16" or "bf16" for a plain Hugging Face checkpoint instead of GPTQ.
    shards: 1 writes model.safetensors; more writes model-0000k-of-0000n.safetensors plus the index.
    exist_ok: if out_dir already holds a synthetic checkpoint with the config.json these settings write (and
    its weights), keep it and return its summary with "kept": True, so a set-up command can be run twice.
    """
    t0 = time.perf_counter()
    cfg = _validate(preset, bits, group_size, dense_dtype, checkpoint_format, layers, shards)
    float_dtype = DENSE_DTYPES[dense_dtype] if dense_dtype else "F16"
    qc = None if dense_dtype else QuantConfig(bits=bits, group_size=group_size, desc_act=bool(act_order),
                                              sym=bool(sym), checkpoint_format=checkpoint_format,
                                              damp_percent=0.1)
    plan = model_plan(cfg, qc, float_dtype)
    parts = split_shards(plan, shards)
    names = shard_names(shards)
    metadata = safetensors_metadata(qc)
    sizes = [file_size([p.spec for p in part], metadata) for part in parts]
    if exist_ok and _same_checkpoint(out_dir, config_json(cfg, qc, float_dtype), names):
        return {"out_dir": os.path.abspath(out_dir), "preset": preset, "n_layers": cfg.n_layers,
                "vocab_size": cfg.vocab_size, "kept": True, "files": sorted(os.listdir(out_dir)),
                "seconds": time.perf_counter() - t0}
    check_free_space(out_dir, sum(sizes) + SMALL_FILES_ALLOWANCE, "write fewer layers with --layers N")

    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"{out_dir}: directory is not empty; synth writes into a new or empty directory "
                              "so it never mixes with or overwrites another checkpoint")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    progress = Progress("synth:", sum(p.spec.nbytes for p in plan), enabled=not quiet, unit="B",
                        stream=progress_stream or sys.stderr, every=0.5)
    try:
        write_json(os.path.join(out_dir, "config.json"), config_json(cfg, qc, float_dtype))
        if qc is not None:
            write_json(os.path.join(out_dir, "quantize_config.json"), quantization_block(qc))
        write_json(os.path.join(out_dir, "generation_config.json"), GENERATION_CONFIG)
        t_tok = time.perf_counter()
        write_tokenizer(out_dir, cfg.vocab_size, seed)
        tokenizer_seconds = time.perf_counter() - t_tok
        if shards > 1:
            weight_map = {p.spec.name: name for name, part in zip(names, parts) for p in part}
            write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                       {"metadata": {"total_size": sum(p.spec.nbytes for p in plan)},
                        "weight_map": dict(sorted(weight_map.items()))})
        t_w = time.perf_counter()
        done = 0
        for name, part in zip(names, parts):
            done += write_shard(os.path.join(out_dir, name), part, metadata, seed, progress, done)
        write_seconds = time.perf_counter() - t_w
    except BaseException:
        # The directory was new or empty when we started, so everything in it is ours to remove.
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for entry in os.listdir(out_dir):
                path = os.path.join(out_dir, entry)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        raise
    finally:
        progress.close()
    return {
        "out_dir": os.path.abspath(out_dir),
        "preset": preset, "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size,
        "format": dense_dtype or f"gptq {bits}-bit g{group_size}{' act-order' if act_order else ''}",
        "files": sorted(os.listdir(out_dir)), "kept": False,
        "safetensors_bytes": sum(sizes),
        "tokenizer_seconds": tokenizer_seconds,
        "write_seconds": write_seconds,
        "seconds": time.perf_counter() - t0,
    }


def _same_checkpoint(out_dir, config, safetensors_names):
    """Does out_dir hold a checkpoint with this config.json and all its safetensors files? (--exist-ok)"""
    try:
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
            existing = json.load(f)
    except (OSError, ValueError):
        return False
    return existing == json.loads(json.dumps(config)) and \
        all(os.path.isfile(os.path.join(out_dir, n)) for n in safetensors_names)


def write_tokenizer(out_dir, vocab_size, seed):
    """tokenizer.model (+ JSON files) with Meditron-style ChatML tokens whose ids lie past the embedding.

    Llama-2's SentencePiece model has 32000 pieces; Meditron's embedding has 32017 rows (Megatron padding),
    and its added_tokens.json puts <|im_start|> and <|im_end|> at 32017 and 32018, i.e. at and past the
    embedding's end. We copy that: pieces = min(rows, 32000), added tokens at rows and rows + 1."""
    pieces = min(vocab_size, LLAMA_SENTENCEPIECE_VOCAB)
    write_tokenizer_files(out_dir, pieces, added_tokens={"<|im_start|>": vocab_size, "<|im_end|>": vocab_size + 1},
                          seed=seed)
