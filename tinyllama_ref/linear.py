"""One interface for every matrix multiply in the model: `linear(x)` with x [N, in] -> [N, out] float32.

Two kinds of weights sit behind it:
  - dense (F32 / F16 / BF16), stored as Hugging Face does: weight [out, in], so y = x @ W.T;
  - GPTQ packed (quant.py), 2/3/4/8-bit codes with per-group scales and zeros.
and two backends: "numpy" (the readable reference) and "numba" (kernels/, same results, fast).
The model never looks inside; it only calls.
"""

from .checkpoint import to_f32
from .errors import CheckpointError

BACKENDS = ("numpy", "numba")


class DenseLinear:
    """y = x @ W.T for a dense Hugging Face weight [out, in] that stays a view into the memory map."""

    def __init__(self, weight, dtype, name="", backend="numpy"):
        self.weight = weight            # [out, in], stored dtype (BF16 as uint16)
        self.dtype = dtype
        self.name = name
        self.backend = backend
        self.out_features, self.in_features = weight.shape

    @property
    def nbytes(self):
        return self.weight.nbytes

    def __call__(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input has {x.shape[-1]} features, weight expects {self.in_features}")
        if self.dtype == "F32":
            return x @ self.weight.T                                    # [N, out]
        if self.backend == "numba" and self.dtype in ("F16", "BF16"):
            from .kernels.generic.half import half_linear
            return half_linear(x, self.weight, self.dtype)              # [N, out]
        return x @ to_f32(self.weight, self.dtype).T                    # [N, out]


def make_linear(ckpt, prefix, quant_config, backend, in_features, out_features, repack=True, gptq_mode="exact",
                cpu=None):
    """The linear layer stored under `prefix` (e.g. "model.layers.0.self_attn.q_proj"), checked for shape.

    repack=False asks the GPTQ kernels to read the packed words where they lie (streamed layers: a layout
    prepared at load would be thrown away after one use). gptq_mode: see quant.check_gptq_mode; cpu: the
    kernels' CPU tier (quant.check_cpu).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if prefix + ".qweight" in ckpt:
        from .quant import GPTQLinear
        return GPTQLinear.from_checkpoint(ckpt, prefix, quant_config, backend, in_features, out_features,
                                          repack=repack, mode=gptq_mode, cpu=cpu)
    name = prefix + ".weight"
    info = ckpt.info(name)
    if info.shape != (out_features, in_features):
        raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected "
                              f"[{out_features}, {in_features}] from config.json")
    if info.dtype not in ("F32", "F16", "BF16"):
        raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, expected F32, F16 or BF16")
    return DenseLinear(ckpt.raw(name), info.dtype, name, backend)
