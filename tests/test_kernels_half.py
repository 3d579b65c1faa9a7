"""kernels/generic/half.py: fp16 / bf16 widening without a float16 type, and the dense half-precision linear."""

import numpy as np
import pytest

from tinyllama_ref.kernels.generic import half


def test_every_fp16_value_widens_exactly():
    bits = np.arange(65536, dtype=np.uint16).reshape(256, 256)             # every half, incl. inf / NaN
    out = np.empty(bits.shape, dtype=np.float32)
    half.widen(bits, False, out)
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


def test_every_bf16_value_widens_exactly():
    bits = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = np.empty(bits.shape, dtype=np.float32)
    half.widen(bits, True, out)
    expected = (bits.astype(np.uint32) << 16).view(np.float32)              # bf16 = top half of a float32
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
@pytest.mark.parametrize("n_rows", [1, 2, 3, half.FUSED_MAX_ROWS, half.FUSED_MAX_ROWS + 4])
def test_half_linear_matches_float32_matmul(dtype, n_rows, monkeypatch):
    monkeypatch.setattr(half, "TILE_ROWS", 48)                              # several tiles in the BLAS path
    rng = np.random.default_rng(n_rows)
    w32 = rng.normal(size=(130, 4100)).astype(np.float32)                   # [out, in], odd sizes
    if dtype == "F16":
        weight = w32.astype(np.float16)
        exact = weight.astype(np.float32)
    else:
        weight = (w32.view(np.uint32) >> 16).astype(np.uint16)              # truncate to bf16 bits
        exact = (weight.astype(np.uint32) << 16).view(np.float32)
    x = rng.normal(size=(n_rows, 4100)).astype(np.float32)                  # [N, in]
    y = half.half_linear(x, weight, dtype)
    expected = x @ exact.T                                                  # [N, out]
    assert y.shape == (n_rows, 130) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_half_linear_refuses_other_dtypes():
    with pytest.raises(ValueError, match="F16 or BF16"):
        half.half_linear(np.zeros((1, 4), np.float32), np.zeros((2, 4), np.float32), "F32")
