"""The opt-in int8-activation GEMV (kernels/vnni/int8.py): exact integer arithmetic on rounded activations."""

import numpy as np
import pytest

from gptq_packer import make_layer, quantize_config
from tinyllama_ref import quant
from tinyllama_ref.errors import ConfigError
from tinyllama_ref.kernels import gptq, table
from tiers import RUNNABLE, below, needs
from tinyllama_ref.kernels.vnni import int8

pytestmark = needs("vnni")


def _rounded(x, block=32):
    """Round-to-nearest int8 per block of 32 with scale max|x| / 127: written from the module docstring."""
    out = np.empty_like(x)
    for n in range(x.shape[0]):
        for b in range(0, x.shape[1], block):
            chunk = x[n, b:b + block]
            d = np.float32(np.abs(chunk).max() / 127.0) or np.float32(1.0)
            out[n, b:b + block] = np.clip(np.rint(chunk / d), -127, 127) * d
    return out


def test_quantize_activations_rounds_per_block_and_packs_even_then_odd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 64)).astype(np.float32)
    x[1, :32] = 0.0                                                          # an all-zero block
    packed, scale, x_hat = int8.quantize_activations(x)
    np.testing.assert_allclose(x_hat, _rounded(x), rtol=0, atol=1e-6)
    codes = np.rint(x_hat / np.repeat(scale, 32, axis=1)).astype(np.int8)   # [2, 64]
    as_bytes = packed.view(np.int8).reshape(2, 8, 8)                        # [N, word, 8 bytes]
    for w in range(8):
        np.testing.assert_array_equal(as_bytes[:, w, :4], codes[:, 8 * w:8 * w + 8:2])    # inputs 0,2,4,6
        np.testing.assert_array_equal(as_bytes[:, w, 4:], codes[:, 8 * w + 1:8 * w + 8:2])  # inputs 1,3,5,7


def _x_hat_in_input_order(plan, x):
    xp = gptq.permute_x(plan, x)
    _, _, x_hat = int8.quantize_activations(xp)
    if plan.perm is None:
        return x_hat[:, :x.shape[1]]
    out = np.zeros_like(x)
    real = plan.perm >= 0
    out[:, plan.perm[real]] = x_hat[:, real]
    return out


@pytest.mark.parametrize("n_in,n_out,group_size,act_order,sym", [
    (256, 96, 32, True, True), (256, 40, -1, False, False), (512, 77, 128, True, False),
    (192, 48, 64, False, True)])
def test_int8_gemv_is_exact_on_rounded_activations(n_in, n_out, group_size, act_order, sym):
    rng = np.random.default_rng(n_in + n_out)
    layer = make_layer(rng, n_in, n_out, 4, group_size, act_order=act_order, sym=sym)
    plan = gptq.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, "gptq")
    assert int8.supports(plan)
    for n_rows in (1, 3):
        x = rng.normal(size=(n_rows, n_in)).astype(np.float32)
        y = gptq.gptq_matmul(plan, x, mode="int8")
        expected = _x_hat_in_input_order(plan, x) @ layer["W"]            # [N, out]
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        exact = x @ layer["W"]
        assert np.abs(y - exact).max() < 0.03 * np.abs(exact).max()         # approximate, but close


def test_int8_mode_through_the_layer_and_its_limits():
    rng = np.random.default_rng(3)
    four = make_layer(rng, 128, 64, 4, 32, act_order=True)
    three = make_layer(rng, 128, 64, 3, 32, act_order=True)
    cfg4 = quant.parse_quant_config(quantize_config(4, 32, True), "quantize_config.json")
    cfg3 = quant.parse_quant_config(quantize_config(3, 32, True), "quantize_config.json")
    lin4 = quant.GPTQLinear(four["qweight"], four["qzeros"], four["scales"], four["g_idx"], cfg4, 128, 64,
                            backend="numba")
    lin3 = quant.GPTQLinear(three["qweight"], three["qzeros"], three["scales"], three["g_idx"], cfg3, 128, 64,
                            backend="numba")
    x = rng.normal(size=(1, 128)).astype(np.float32)
    exact4 = lin4(x)
    lin4.mode = lin3.mode = "int8"
    approx4 = lin4(x)
    assert not np.array_equal(approx4, exact4)                              # int8 really ran
    np.testing.assert_allclose(approx4, _x_hat_in_input_order(lin4._plan, x) @ four["W"], rtol=1e-5,
                               atol=1e-5 * np.abs(approx4).max())
    # 3-bit decode rows stay exact; prefill rows of both widths take the int8 GEMM (test_kernels_int8_gemm.py).
    np.testing.assert_allclose(lin3(x), x @ three["W"], rtol=1e-4, atol=1e-4 * np.abs(x @ three["W"]).max())
    xs = rng.normal(size=(table.INT8_GEMV_MAX_ROWS + 1, 128)).astype(np.float32)   # past the GEMV's rows
    for lin, w in ((lin4, four["W"]), (lin3, three["W"])):
        approx = lin(xs)
        np.testing.assert_allclose(approx, _x_hat_in_input_order(lin._plan, xs) @ w, rtol=1e-5,
                                   atol=1e-5 * np.abs(approx).max())
        assert not np.allclose(approx, xs @ w, rtol=1e-6, atol=1e-6 * np.abs(approx).max())   # int8 really ran
    with pytest.raises(ConfigError, match="must be one of exact, int8"):
        quant.check_gptq_mode("int4")
