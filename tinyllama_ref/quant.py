"""GPTQ weights: the quantization settings, and a plain NumPy reading of the packed tensors.

This file is the reference: every function here can be followed line by line. The fast path computes the same
thing in kernels/gptq.py, and tests/ checks the two against a packer written from docs/formats.md.

A GPTQ linear layer stores, for W laid out [in, out] so that y = x @ W (AutoGPTQ's qlinear convention):

    qweight [ceil(in * bits / 32), out] int32   codes q[i, j], each column one little-endian bit stream
    qzeros  [G, ceil(out * bits / 32)]  int32   zero codes z[g, j], each row one bit stream
    scales  [G, out]                    fp16    s[g, j]
    g_idx   [in]                        int32   the group of each input row (not monotonic with act-order)

    W[i, j] = s[g_idx[i], j] * (q[i, j] - zero[g_idx[i], j])

where zero = (z + 1) & (2**bits - 1) for checkpoint_format "gptq" (AutoGPTQ "v1" writes zero - 1) and
zero = z for "gptq_v2" (GPTQModel stores the true zero).
"""

import os
import time
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, QuantError

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
GPTQ_MODES = ("exact", "int8")


def check_gptq_mode(mode, tier=None):
    """How the numba backend treats activations in GPTQ layers; a parameter of load(), never a global.

    "exact" (the default) is float32 throughout and matches the reference; "int8" is the opt-in approximate
    mode: activations rounded to int8 per block of 32 and integer dot products with the codes, where
    kernels/table.py has an int8 kernel for the layer (4-bit decode rows; 3- and 4-bit prefill), at the CPU
    tiers avx2 and above (vpdpbusd on VNNI, maddubs/madd on AVX2). Other layers stay exact.
    """
    if mode not in GPTQ_MODES:
        raise ConfigError(f"GPTQ activation mode must be one of {', '.join(GPTQ_MODES)}, got {mode!r}")
    if mode == "int8":
        from .kernels import cpu, table
        tier = tier or cpu.process_tier()
        if not table.int8_available(tier):
            raise ConfigError(f"GPTQ activation mode int8 has no kernels at CPU tier {tier} (it needs AVX2 or "
                              "above); use the exact mode on this machine")
    return mode


def check_cpu(cpu):
    """The CPU tier whose kernels a model runs (kernels/cpu.py): this process's, or a lower one named by cpu
    ("generic", "avx2", "avx512", "vnni", "amx"); a ConfigError for a name that is not a tier or above it."""
    from .kernels import cpu as cpu_model
    try:
        return cpu_model.resolve(cpu)
    except cpu_model.TierError as e:
        raise ConfigError(str(e)) from None


# -- the quantization settings -----------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantConfig:
    bits: int                       # 2, 3, 4 or 8
    group_size: int                 # inputs per group; -1 means one group over all inputs
    desc_act: bool = False          # act-order: g_idx is a permutation-derived, non-monotonic map
    sym: bool = True                # symmetric: every stored zero is the same (read them anyway)
    checkpoint_format: str = "gptq"  # "gptq" (stored zero + 1 = true zero) or "gptq_v2" (true zero)
    damp_percent: float = 0.01
    true_sequential: bool = True
    static_groups: bool = False
    quant_method: str = "gptq"
    source: str = ""                # the file the settings came from (for error messages)

    def n_groups(self, in_features):
        """G = ceil(in / group_size); group size -1 means a single group."""
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)


def _field(block, key, kinds, default, path):
    value = block.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{path}: {key} must be {' or '.join(k.__name__ for k in kinds)}, found {value!r}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{path}: {key} must be {' or '.join(k.__name__ for k in kinds)}, found {value!r}")
    return value


def parse_quant_config(block, path):
    """QuantConfig from a quantize_config.json dict (or config.json's "quantization_config" block)."""
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: the quantization settings must be a JSON object, found {type(block).__name__}")
    method = _field(block, "quant_method", (str,), "gptq", path).lower()
    if method != "gptq":
        raise ConfigError(f"{path}: quant_method {method!r} is not supported; only GPTQ checkpoints can be read "
                          "(use a GPTQ branch of the model, or a dense fp16/bf16 checkpoint)")
    if block.get("bits") is None:
        raise ConfigError(f"{path}: missing field 'bits' (GPTQ settings always name the bit width)")
    bits = _field(block, "bits", (int,), None, path)
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"{path}: bits {bits} is not supported; GPTQ weights here must be "
                          f"{', '.join(map(str, SUPPORTED_BITS))} bits")
    group_size = _field(block, "group_size", (int,), -1, path)
    if group_size != -1 and group_size <= 0:
        raise ConfigError(f"{path}: group_size must be -1 (one group) or a positive number of inputs, "
                          f"found {group_size}")
    # GPTQModel writes "format"; AutoGPTQ >= 0.7 writes "checkpoint_format". Both mean the same thing.
    fmt = block.get("checkpoint_format", block.get("format", "gptq"))
    if fmt is None:
        fmt = "gptq"
    if not isinstance(fmt, str) or fmt.lower() not in CHECKPOINT_FORMATS:
        raise ConfigError(f"{path}: checkpoint_format {fmt!r} is not supported; expected one of "
                          f"{', '.join(CHECKPOINT_FORMATS)} (marlin / bitblas / exllama repacks must be converted "
                          "back to plain GPTQ first)")
    damp = _field(block, "damp_percent", (int, float), 0.01, path)
    return QuantConfig(
        bits=bits,
        group_size=group_size,
        desc_act=_field(block, "desc_act", (bool,), False, path),
        sym=_field(block, "sym", (bool,), True, path),
        checkpoint_format=fmt.lower(),
        damp_percent=float(damp),
        true_sequential=_field(block, "true_sequential", (bool,), True, path),
        static_groups=_field(block, "static_groups", (bool,), False, path),
        quant_method=method,
        source=path,
    )


def read_quant_config(checkpoint_dir):
    """The GPTQ settings of a checkpoint directory, or None for a dense checkpoint.

    quantize_config.json wins; config.json's "quantization_config" is the fallback. When both exist they must
    agree on bits and group size, since a silent mismatch would decode every weight wrongly.
    """
    from .config import read_json

    qpath = os.path.join(checkpoint_dir, "quantize_config.json")
    cpath = os.path.join(checkpoint_dir, "config.json")
    from_quantize = parse_quant_config(read_json(qpath), qpath) if os.path.exists(qpath) else None
    from_config = None
    if os.path.exists(cpath):
        block = read_json(cpath).get("quantization_config")
        if block is not None:
            from_config = parse_quant_config(block, cpath + " (quantization_config)")
    if from_quantize and from_config:
        for key in ("bits", "group_size"):
            a, b = getattr(from_quantize, key), getattr(from_config, key)
            if a != b:
                raise ConfigError(f"{qpath}: {key} is {a} but {cpath} quantization_config says {b}; "
                                  "fix whichever file is wrong (the tensor shapes tell which)")
    return from_quantize or from_config


# -- the reference: unpack, dequantize, multiply -----------------------------------------------------------

def unpack_columns(qweight, bits, n_rows):
    """Integer codes [n_rows, out] from packed words [ceil(n_rows * bits / 32), out].

    Each column is one little-endian bit stream of 32-bit words: value t sits at bit offset bits * t. For 3
    bits some values straddle two words, so each value is read as (low word >> offset) | (next word << ...).
    """
    words = np.ascontiguousarray(qweight).view(np.uint32).astype(np.uint64)   # [R, out]
    words = np.concatenate([words, np.zeros_like(words[:1])])                 # [R + 1, out] (for straddlers)
    pos = np.arange(n_rows, dtype=np.uint64) * np.uint64(bits)                # [in] bit offset of each value
    word = (pos // np.uint64(32)).astype(np.int64)                            # [in] the word it starts in
    offset = (pos % np.uint64(32))[:, None]                                   # [in, 1]
    low = words[word] >> offset                                               # [in, out]
    high = words[word + 1] << (np.uint64(32) - offset)                        # [in, out] bits past the word
    mask = np.uint64((1 << bits) - 1)
    return ((low | high) & mask).astype(np.int32)                             # [in, out]


def unpack_zeros(qzeros, bits, out_features):
    """Stored zero codes [G, out] from qzeros [G, ceil(out * bits / 32)]: each ROW is one bit stream."""
    return unpack_columns(np.ascontiguousarray(qzeros.T), bits, out_features).T   # [G, out]


def true_zeros(stored, bits, checkpoint_format):
    """The zero point subtracted from each code. AutoGPTQ "v1" ("gptq") writes zero - 1, so add the 1 back,
    wrapping to `bits` as AutoGPTQ's own readers do; "gptq_v2" stores the true zero."""
    if checkpoint_format == "gptq":
        return (stored + 1) & ((1 << bits) - 1)
    return stored


def stored_zeros(zeros, bits, checkpoint_format):
    """The inverse of true_zeros, for writers (synth, quantize): "gptq" stores zero - 1 wrapped to `bits` (a
    zero of 0 becomes 2**bits - 1), "gptq_v2" the zero itself."""
    zeros = np.asarray(zeros)
    if checkpoint_format == "gptq":
        return (zeros - 1) & ((1 << bits) - 1)
    if checkpoint_format == "gptq_v2":
        return zeros
    raise QuantError(f"checkpoint_format must be one of {', '.join(CHECKPOINT_FORMATS)}, got {checkpoint_format!r}")


def scales_f32(scales):
    return np.asarray(scales, dtype=np.float32)


def dequantize(qweight, qzeros, scales, g_idx, bits, checkpoint_format="gptq"):
    """The float32 weight W [in, out] (so y = x @ W) of one GPTQ linear layer."""
    n_in, n_out = len(g_idx), qweight.shape[1]
    q = unpack_columns(qweight, bits, n_in)                                   # [in, out] codes
    z = true_zeros(unpack_zeros(qzeros, bits, n_out), bits, checkpoint_format)   # [G, out]
    s = scales_f32(scales)                                                    # [G, out]
    g = np.asarray(g_idx, dtype=np.int64)                                     # [in]
    return s[g] * (q.astype(np.float32) - z[g].astype(np.float32))            # [in, out]


def dequantized_slabs(qweight, qzeros, scales, g_idx, bits, checkpoint_format="gptq", columns_per_step=4096):
    """(j0, j1, W[:, j0:j1]) for slabs of about columns_per_step output columns, so that a 70B layer never
    needs more than in * columns_per_step floats (and their unpacking temporaries) at once."""
    n_out = qweight.shape[1]
    per_word = 32 // np.gcd(32, bits)                  # output columns per whole number of qzeros words
    step = max(per_word, columns_per_step // per_word * per_word)
    for j0 in range(0, n_out, step):
        j1 = min(n_out, j0 + step)
        z0, z1 = j0 * bits // 32, -(-j1 * bits // 32)   # the qzeros words that hold columns j0..j1
        yield j0, j1, dequantize(qweight[:, j0:j1], qzeros[:, z0:z1], scales[:, j0:j1], g_idx, bits,
                                 checkpoint_format)                           # [in, j1 - j0]


def gptq_matmul_reference(x, qweight, qzeros, scales, g_idx, bits, checkpoint_format="gptq", bias=None,
                          columns_per_step=4096):
    """y = x @ W + bias with W dequantized a slab of output columns at a time. x [N, in] -> y [N, out]."""
    y = np.empty((x.shape[0], qweight.shape[1]), dtype=np.float32)            # [N, out]
    for j0, j1, w in dequantized_slabs(qweight, qzeros, scales, g_idx, bits, checkpoint_format,
                                       columns_per_step):
        y[:, j0:j1] = x @ w                                                   # [N, j1 - j0]
    if bias is not None:
        y += bias
    return y


# -- the inverse, for writers (the quantizer) ---------------------------------------------------------------

def pack_columns(codes, bits):
    """Packed int32 words [ceil(in * bits / 32), out] from integer codes [in, out] (inverse of unpack_columns)."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise QuantError(f"pack_columns: codes must lie in [0, {1 << bits}) for {bits}-bit weights, found "
                         f"[{codes.min()}, {codes.max()}]")
    n_in, n_out = codes.shape
    n_words = -(-n_in * bits // 32)
    words = np.zeros((n_words + 1, n_out), dtype=np.uint64)                   # [R + 1, out]
    for t in range(n_in):
        word, offset = divmod(t * bits, 32)
        v = codes[t].astype(np.uint64) << np.uint64(offset)                   # [out] may cross into word + 1
        words[word] |= v & np.uint64(0xFFFFFFFF)
        words[word + 1] |= v >> np.uint64(32)
    return words[:n_words].astype(np.uint32).view(np.int32)                   # [R, out]


def pack_zeros(zeros, bits):
    """Packed qzeros [G, ceil(out * bits / 32)] from stored zero codes [G, out] (each row one bit stream)."""
    return np.ascontiguousarray(pack_columns(np.asarray(zeros).T, bits).T)    # [G, words]


# -- checking a layer's tensors ----------------------------------------------------------------------------

def default_g_idx(in_features, group_size):
    """The g_idx of a checkpoint without act-order: consecutive runs of group_size inputs."""
    if group_size == -1:
        return np.zeros(in_features, dtype=np.int32)
    return (np.arange(in_features) // group_size).astype(np.int32)


def validate_tensors(name, file, in_features, out_features, cfg, qweight, qzeros, scales, g_idx, bias=None):
    """Raise QuantError unless the tensors of one layer agree with each other, with the config and with the
    model's shape. After this, every g_idx value is a valid row of scales/qzeros, so kernels need no checks."""
    bits = cfg.bits
    G = cfg.n_groups(in_features)
    hint_bits = f"(is the bits field of {cfg.source or 'the quantization config'} right?)"
    hint_group = f"(is the group_size field of {cfg.source or 'the quantization config'} right?)"

    def fail(tensor, what, hint):
        raise QuantError(f"{file}: tensor {name}.{tensor} {what} {hint}")

    def check(tensor, array, dtypes, shape, hint):
        if array.dtype not in dtypes:
            fail(tensor, f"has dtype {array.dtype}, expected {' or '.join(str(np.dtype(d)) for d in dtypes)}",
                 "(is this a GPTQ checkpoint written by AutoGPTQ / GPTQModel?)")
        if tuple(array.shape) != tuple(shape):
            fail(tensor, f"has shape {list(array.shape)}, expected {list(shape)} for {bits}-bit weights with "
                         f"{in_features} inputs, {out_features} outputs and {G} groups", hint)

    check("qweight", qweight, (np.int32,), (-(-in_features * bits // 32), out_features), hint_bits)
    check("scales", scales, (np.float16,), (G, out_features), hint_group)
    check("qzeros", qzeros, (np.int32,), (G, -(-out_features * bits // 32)), hint_group)
    check("g_idx", g_idx, (np.int32,), (in_features,), "")
    if bias is not None:
        check("bias", bias, (np.float16, np.float32), (out_features,), "")
    gmin, gmax = int(g_idx.min()), int(g_idx.max())
    if gmin < 0 or gmax >= G:
        bad = int(np.flatnonzero((g_idx < 0) | (g_idx >= G))[0])
        fail("g_idx", f"holds group {int(g_idx[bad])} at input {bad}, outside [0, {G}) for {in_features} inputs "
                      f"in groups of {cfg.group_size}", hint_group)


# -- the layer the model calls ------------------------------------------------------------------------------

class GPTQLinear:
    """y = x @ W + bias for one GPTQ layer; W is never stored as floats.

    backend "numpy": dequantize a slab at a time and multiply (the reference above).
    backend "numba": kernels/gptq.py; a layout is prepared once here (see prepare_seconds). repack=False
    (numba only) never copies qweight: act-order layers with several groups are then read in place through
    g_idx instead of being repacked sorted by group (slower per call, no load-time cost: for layers that are
    streamed from disk every token).
    """

    def __init__(self, qweight, qzeros, scales, g_idx, cfg, in_features, out_features, bias=None,
                 backend="numpy", name="", file="<arrays>", tensor_names=(), repack=True, mode="exact",
                 cpu=None):
        if g_idx is None:
            g_idx = default_g_idx(in_features, cfg.group_size)
        validate_tensors(name, file, in_features, out_features, cfg, qweight, qzeros, scales, g_idx, bias)
        self.qweight, self.qzeros, self.scales, self.g_idx = qweight, qzeros, scales, g_idx
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float32)     # [out]
        self.bits, self.group_size, self.checkpoint_format = cfg.bits, cfg.group_size, cfg.checkpoint_format
        self.in_features, self.out_features = in_features, out_features
        self.backend, self.name, self.file = backend, name, file
        self.tensor_names = list(tensor_names)
        self.nbytes = int(qweight.nbytes + qzeros.nbytes + scales.nbytes + g_idx.nbytes)
        self.prepare_seconds = 0.0
        self.tier = check_cpu(cpu) if backend == "numba" else None      # kernels/cpu.py
        self.mode = check_gptq_mode(mode, self.tier)   # "exact", or the opt-in approximate "int8" (numba)
        self._plan = None
        if backend == "numba":
            from .kernels import gptq as kernels
            t0 = time.perf_counter()
            # A tier named by the caller is the layer's; none leaves the choice to the table (repacked_tier).
            self._plan = kernels.prepare(qweight, qzeros, scales, g_idx, cfg.bits, cfg.checkpoint_format,
                                         repack=repack, tier=None if cpu is None else self.tier, mode=self.mode)
            self.tier = self._plan.tier
            self.prepare_seconds = time.perf_counter() - t0
        elif backend != "numpy":
            raise ValueError(f"backend must be 'numpy' or 'numba', got {backend!r}")

    @classmethod
    def from_checkpoint(cls, ckpt, prefix, quant_config, backend, in_features, out_features, repack=True,
                        mode="exact", cpu=None):
        """The layer stored under `prefix` (e.g. "model.layers.3.mlp.up_proj") as zero-copy views; repack,
        mode and cpu as in __init__."""
        names = {t: f"{prefix}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        file = ckpt.info(names["qweight"]).file
        if quant_config is None:
            raise QuantError(f"{file}: tensor {names['qweight']} is GPTQ-packed but the checkpoint has no "
                             "quantize_config.json and no quantization_config in config.json (add one naming "
                             "bits and group_size)")
        for t in ("qzeros", "scales"):
            if names[t] not in ckpt:
                raise QuantError(f"{file}: tensor {names[t]} is missing but {names['qweight']} is present "
                                 "(every GPTQ layer needs qweight, qzeros and scales)")
        meta = ckpt.metadata()
        if "gptq_bits" in meta and str(meta["gptq_bits"]) != str(quant_config.bits):
            raise QuantError(f"{file}: __metadata__ says gptq_bits={meta['gptq_bits']} but "
                             f"{quant_config.source} says bits={quant_config.bits}; one of them is wrong")
        used = [names["qweight"], names["qzeros"], names["scales"]]
        g_idx = None
        if names["g_idx"] in ckpt:
            g_idx = ckpt.raw(names["g_idx"])
            used.append(names["g_idx"])
        elif quant_config.desc_act:
            raise QuantError(f"{file}: tensor {names['g_idx']} is missing but desc_act is true in "
                             f"{quant_config.source}; act-order layers need g_idx to find each input's group")
        bias = None
        if names["bias"] in ckpt:
            bias = ckpt.raw(names["bias"])
            used.append(names["bias"])
        return cls(ckpt.raw(names["qweight"]), ckpt.raw(names["qzeros"]), ckpt.raw(names["scales"]), g_idx,
                   quant_config, in_features, out_features, bias=bias, backend=backend, name=prefix, file=file,
                   tensor_names=used, repack=repack, mode=mode, cpu=cpu)

    @property
    def copied_tensors(self):
        """Checkpoint tensors the numba plan copied (repacked): their mapped pages are not needed any more."""
        if self._plan is not None and self._plan.repacked:
            return [n for n in self.tensor_names if n.endswith(".qweight")]
        return []

    def dequantize(self):
        """The float32 W [in, out] (for tests and inspection; the forward pass never builds it)."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.checkpoint_format)

    def __call__(self, x):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self.name}: input has shape {list(x.shape)}, expected [N, {self.in_features}]")
        if self._plan is None:
            return gptq_matmul_reference(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                                         self.checkpoint_format, self.bias)          # [N, out]
        from .kernels import gptq as kernels
        y = kernels.gptq_matmul(self._plan, np.ascontiguousarray(x, dtype=np.float32), self.mode)  # [N, out]
        if self.bias is not None:
            y += self.bias
        return y
