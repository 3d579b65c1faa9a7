"""The one validation pass at load: the checkpoint as a whole is checked before anything is built from it.

`Model.__init__` (and so `load()`, `inspect` and every command) calls `validate_checkpoint` right after reading
config.json and the quantization settings, before the embedding, the head or any layer exists. It reads
headers and small JSON files only, never tensor data, so it costs milliseconds even for a 70B checkpoint:

  1. config.json values are typed and ranged when they are read (config.py), quantize_config.json's too
     (quant.py); here they are checked against the tensors.
  2. num_hidden_layers against the model.layers.N tensors present, first and at once: a config that says
     10**9 layers is refused before any per-layer work.
  3. Every tensor each role needs (embedding, per layer two norms and seven linears, final norm, lm_head) is
     present, with a dtype its role allows and the shape the config implies. A linear is dense (`.weight`)
     or GPTQ (`.qweight`, `.qzeros`, `.scales`, optional `.g_idx` and `.bias`), never both.
  4. Nothing is left over: a tensor the config does not account for (a fifth layer under a config of four,
     a bias Llama has no use for) is an error, not silently ignored.
  5. The token ids config.json names lie inside the embedding.
  6. The tokenizer's JSON files and generation_config.json have the structure their readers expect
     (tokenizer.py, sampling.py); tokenizer.model, if present, is a regular file.

Errors say which file, which key or tensor, what was expected and what was found. When a tensor and a config
value disagree the error is both kinds (errors.ConfigMismatchError is a ConfigError and a CheckpointError).
What needs the data itself (g_idx values inside the groups, quant.validate_tensors) is checked when a layer is
built.
"""

import os
import re

from .config import check_regular_file, config_ids
from .errors import (CheckpointError, ConfigMismatchError, GPTQMismatchError, GPTQTensorError,
                     TokenizerError)
from .sampling import read_generation_config
from .tokenizer import read_tokenizer_files
from .weights import EMBEDDING, FINAL_NORM, FLOAT_DTYPES, LINEARS, LM_HEAD, NORMS

GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
GPTQ_DTYPES = {"qweight": ("I32",), "qzeros": ("I32",), "scales": ("F16",), "g_idx": ("I32",),
               "bias": ("F16", "F32")}
# Older transformers saved the rotary inverse frequencies with each layer; they are recomputed, not read.
INV_FREQ = "self_attn.rotary_emb.inv_freq"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def validate_checkpoint(path, ckpt, cfg, quant_config):
    """Raise a TinyLlamaError subclass unless checkpoint, config.json, quantization settings and tokenizer
    files describe one consistent Llama model. Returns the vocabulary size (the embedding's rows)."""
    check = _Checker(path, ckpt, cfg, quant_config)
    check.layer_count()
    vocab = check.embedding()
    expected = {EMBEDDING}
    for i in range(cfg.n_layers):
        expected |= check.layer(i)
    expected |= check.head(vocab)
    check.leftovers(expected)
    check.token_ids(vocab)
    check_side_files(path)
    return vocab


def check_side_files(path):
    """The tokenizer and generation JSON files, by the same readers that use them later."""
    read_tokenizer_files(path)
    read_generation_config(path)
    model = os.path.join(path, "tokenizer.model")
    if os.path.lexists(model):
        check_regular_file(model, TokenizerError, "SentencePiece tokenizer.model")


class _Checker:
    def __init__(self, path, ckpt, cfg, quant_config):
        self.ckpt, self.cfg, self.qc = ckpt, cfg, quant_config
        self.metadata = ckpt.metadata()
        self.config_path = os.path.join(path, "config.json")
        files = sorted(ckpt.files)
        index = os.path.join(ckpt.directory, "model.safetensors.index.json")
        # Where a missing tensor "should" be: the one file, or the index that lists the shards.
        self.where = files[0] if len(files) == 1 else index if os.path.exists(index) else ckpt.directory

    # -- helpers ------------------------------------------------------------------------------------------
    def missing(self, name, role, error=CheckpointError):
        raise error(f"{self.where}: tensor {name} is missing ({role})")

    def tensor(self, name, role, dtypes, shape, why, error=CheckpointError, mismatch=ConfigMismatchError):
        """The tensor's info after checking presence, dtype and shape."""
        if name not in self.ckpt:
            self.missing(name, role, error)
        info = self.ckpt.info(name)
        if info.dtype not in dtypes:
            raise error(f"{info.file}: tensor {name} has dtype {info.dtype}, expected {' or '.join(dtypes)} "
                        f"({role})")
        if shape is not None and info.shape != tuple(shape):
            raise mismatch(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {list(shape)} "
                           f"({why})")
        return info

    # -- the checks ---------------------------------------------------------------------------------------
    def layer_count(self):
        """num_hidden_layers against the layer indices present; cheap, and first, whatever the number."""
        n = self.cfg.n_layers
        present = {}
        for name in self.ckpt.tensors:
            m = _LAYER.match(name)
            if m:
                present.setdefault(int(m.group(1)), name)
        held = f"{len(present)} layers" if present else "no decoder layers"
        if present and max(present) >= n:
            k = min(i for i in present if i >= n)
            raise ConfigMismatchError(
                f"{self.config_path}: num_hidden_layers is {n} but {self.ckpt.info(present[k]).file} holds "
                f"tensors of layer {k} (e.g. {present[k]}); {held} in the checkpoint. Fix num_hidden_layers or "
                "remove the extra tensors")
        if len(present) < n:
            first_gap = next(i for i in range(len(present) + 1) if i not in present)
            raise ConfigMismatchError(
                f"{self.config_path}: num_hidden_layers is {n} but the checkpoint holds {held}; tensor "
                f"model.layers.{first_gap}.{NORMS['attn_norm']} is missing from {self.where}")

    def embedding(self):
        cfg = self.cfg
        if EMBEDDING not in self.ckpt:
            self.missing(EMBEDDING, "the token embedding, [vocab, hidden_size]")
        info = self.tensor(EMBEDDING, "the token embedding", FLOAT_DTYPES, None, "")
        if len(info.shape) != 2 or info.shape[1] != cfg.dim or info.shape[0] < 1:
            raise ConfigMismatchError(f"{info.file}: tensor {EMBEDDING} has shape {list(info.shape)}, expected "
                                      f"[vocab, {cfg.dim}] (hidden_size {cfg.dim} from {self.config_path})")
        return info.shape[0]

    def layer(self, i):
        """Layer i's tensor names, after checking each."""
        cfg, prefix = self.cfg, f"model.layers.{i}."
        names = set()
        for norm in NORMS.values():
            name = prefix + norm
            self.tensor(name, f"an RMSNorm weight of layer {i}", FLOAT_DTYPES, (cfg.dim,),
                        f"hidden_size {cfg.dim} from {self.config_path}")
            names.add(name)
        for sub, fin, fout in LINEARS.values():
            names |= self.linear(prefix + sub, fin(cfg), fout(cfg))
        inv_freq = prefix + INV_FREQ
        if inv_freq in self.ckpt:
            self.tensor(inv_freq, "rotary inverse frequencies (recomputed, not read)", FLOAT_DTYPES,
                        (cfg.head_dim // 2,), f"head_dim {cfg.head_dim} from {self.config_path}")
            names.add(inv_freq)
        return names

    def linear(self, prefix, n_in, n_out):
        ckpt = self.ckpt
        parts = [t for t in GPTQ_PARTS if f"{prefix}.{t}" in ckpt]
        dense = f"{prefix}.weight"
        why = (f"{n_in} inputs and {n_out} outputs from hidden_size, intermediate_size and the head counts in "
               f"{self.config_path}")
        if not parts:
            self.tensor(dense, "a dense linear weight, [out, in]", FLOAT_DTYPES, (n_out, n_in), why)
            return {dense}
        if dense in ckpt:
            raise CheckpointError(f"{ckpt.info(dense).file}: tensor {dense} is dense but {prefix}.{parts[0]} is "
                                  "GPTQ-packed; a linear is one or the other")
        for t in ("qweight", "qzeros", "scales"):
            if t not in parts:
                self.missing(f"{prefix}.{t}", f"every GPTQ linear needs qweight, qzeros and scales; "
                             f"{prefix}.{parts[0]} is present", GPTQTensorError)
        qc = self.qc
        if qc is None:
            raise GPTQMismatchError(f"{ckpt.info(prefix + '.qweight').file}: tensor {prefix}.qweight is "
                                    "GPTQ-packed but the checkpoint has no quantize_config.json and no "
                                    "quantization_config in config.json (add one naming bits and group_size)")
        if qc.desc_act and "g_idx" not in parts:
            self.missing(f"{prefix}.g_idx", f"desc_act is true in {qc.source}; act-order layers need g_idx",
                         GPTQTensorError)
        bits, groups = qc.bits, qc.n_groups(n_in)
        words_in, words_out = -(-n_in * bits // 32), -(-n_out * bits // 32)
        shapes = {"qweight": (words_in, n_out), "qzeros": (groups, words_out), "scales": (groups, n_out),
                  "g_idx": (n_in,), "bias": (n_out,)}
        hints = {"qweight": "bits", "qzeros": "bits and group_size", "scales": "group_size"}
        for t in parts:
            hint = f"; is the {hints[t]} field of {qc.source} right?" if t in hints else ""
            self.tensor(f"{prefix}.{t}", f"GPTQ {t}", GPTQ_DTYPES[t], shapes[t],
                        f"{n_in} inputs and {n_out} outputs from {self.config_path}, {bits}-bit weights in "
                        f"{groups} groups{hint}", error=GPTQTensorError, mismatch=GPTQMismatchError)
        meta = self.metadata
        if "gptq_bits" in meta and meta["gptq_bits"] != str(bits):
            raise GPTQMismatchError(f"{ckpt.info(prefix + '.qweight').file}: __metadata__ says gptq_bits="
                                    f"{meta['gptq_bits']} but {qc.source} says bits={bits}; one of them is wrong")
        return {f"{prefix}.{t}" for t in parts}

    def head(self, vocab):
        cfg = self.cfg
        self.tensor(FINAL_NORM, "the final RMSNorm weight", FLOAT_DTYPES, (cfg.dim,),
                    f"hidden_size {cfg.dim} from {self.config_path}")
        names = {FINAL_NORM}
        quantized = [n for n in self.ckpt.tensors if n.startswith("lm_head.") and n != LM_HEAD]
        if quantized:
            info = self.ckpt.info(quantized[0])
            raise CheckpointError(f"{info.file}: tensor {quantized[0]}: a quantized lm_head is not supported "
                                  f"(expected a dense {LM_HEAD})")
        if LM_HEAD in self.ckpt or not cfg.tie_word_embeddings:
            if LM_HEAD not in self.ckpt:
                self.missing(LM_HEAD, f"the output head, [vocab, hidden_size]; tie_word_embeddings is false in "
                             f"{self.config_path}, so the embedding is not reused", ConfigMismatchError)
            self.tensor(LM_HEAD, "the output head", FLOAT_DTYPES, (vocab, cfg.dim),
                        f"{vocab} rows like the embedding, hidden_size {cfg.dim} from {self.config_path}")
            names.add(LM_HEAD)
        return names

    def leftovers(self, expected):
        extra = [n for n in self.ckpt.tensors if n not in expected]
        if not extra:
            return
        extra.sort(key=_natural)
        name = extra[0]
        info = self.ckpt.info(name)
        hint = "Llama has no biases" if name.endswith(".bias") else \
            f"{self.config_path} does not account for it"
        more = f" ({len(extra)} such tensors)" if len(extra) > 1 else ""
        raise ConfigMismatchError(f"{info.file}: tensor {name} is not part of the model{more}: {hint}")

    def token_ids(self, vocab):
        """Only ids config.json itself names (the defaults need not fit a toy vocabulary)."""
        for key in ("bos_token_id", "eos_token_id"):
            for i in config_ids(self.cfg.extra, key, self.config_path):
                if i >= vocab:
                    raise ConfigMismatchError(f"{self.config_path}: {key} {i} is past the embedding's {vocab} "
                                              f"rows ({EMBEDDING} in {self.where})")


def _natural(name):
    """Sort key that puts model.layers.2 before model.layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def check_gptq_indices(ckpt, cfg, quant_config):
    """The one check that reads tensor data: every g_idx value names one of its layer's groups.

    `inspect` runs it after the pass above; a plain load leaves it to each layer's build (quant.py
    validate_tensors), since reading every g_idx of a 70B checkpoint means hundreds of scattered reads.
    """
    if quant_config is None:
        return
    for i in range(cfg.n_layers):
        for sub, fin, _ in LINEARS.values():
            name = f"model.layers.{i}.{sub}.g_idx"
            if name not in ckpt:
                continue
            g_idx, groups = ckpt.raw(name), quant_config.n_groups(fin(cfg))
            bad = (g_idx < 0) | (g_idx >= groups)
            if bad.any():
                at = int(bad.argmax())
                raise GPTQTensorError(f"{ckpt.info(name).file}: tensor {name} holds group {int(g_idx[at])} at "
                                      f"input {at}, outside [0, {groups}) for groups of "
                                      f"{quant_config.group_size} (is the group_size field of "
                                      f"{quant_config.source} right?)")
