"""The NumPy reference (tinyllama_ref/quant.py) against the independent packer in tests/gptq_packer.py."""

import json
import os

import numpy as np
import pytest

from gptq_packer import (make_layer, pack_stream_columns, pack_stream_rows, quantize_config,
                         write_safetensors)
from tinyllama_ref import quant
from tinyllama_ref.checkpoint import Checkpoint
from tinyllama_ref.errors import ConfigError, QuantError

# The six Meditron-70B GPTQ branches (docs/formats.md), all act-order, then the other cases the issue names.
MEDITRON = [(4, -1), (4, 128), (4, 32), (3, -1), (3, 128), (3, 32)]


def test_packer_follows_the_format_examples():
    # 4 bits: value t sits at bits 4t..4t+3 of word t // 8.
    codes = np.arange(16).reshape(16, 1) % 16
    words = pack_stream_columns(codes, 4).view(np.uint32)
    assert words.shape == (2, 1)
    assert words[0, 0] == 0x76543210 and words[1, 0] == 0xFEDCBA98
    # 3 bits: value 10 has 2 bits at the top of word 0 and 1 bit at the bottom of word 1;
    # value 21 has 1 bit at the top of word 1 and 2 bits at the bottom of word 2.
    codes = np.zeros((32, 1), dtype=np.int64)
    codes[10] = 0b101
    words = pack_stream_columns(codes, 3).view(np.uint32)
    assert words.shape == (3, 1)
    assert words[0, 0] == 0b01 << 30 and words[1, 0] == 0b1 and words[2, 0] == 0
    codes[:] = 0
    codes[21] = 0b110
    words = pack_stream_columns(codes, 3).view(np.uint32)
    assert words[0, 0] == 0 and words[1, 0] == 0 and words[2, 0] == 0b11
    codes[21] = 0b111
    words = pack_stream_columns(codes, 3).view(np.uint32)
    assert words[1, 0] == 1 << 31 and words[2, 0] == 0b11


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n_in,n_out", [(64, 24), (96, 40), (40, 7)])
def test_unpack_and_pack_match_the_independent_packer(bits, n_in, n_out):
    rng = np.random.default_rng(bits * 1000 + n_in + n_out)
    codes = rng.integers(0, 2 ** bits, size=(n_in, n_out))                 # [in, out]
    packed = pack_stream_columns(codes, bits)
    assert np.array_equal(quant.unpack_columns(packed, bits, n_in), codes)
    assert np.array_equal(quant.pack_columns(codes, bits), packed)
    zeros = rng.integers(0, 2 ** bits, size=(5, n_out))                     # [G, out]
    qzeros = pack_stream_rows(zeros, bits)
    assert np.array_equal(quant.unpack_zeros(qzeros, bits, n_out), zeros)
    assert np.array_equal(quant.pack_zeros(zeros, bits), qzeros)


def test_pack_columns_refuses_codes_out_of_range():
    with pytest.raises(QuantError, match="codes must lie in"):
        quant.pack_columns(np.array([[16]]), 4)


CASES = ([dict(bits=b, group_size=g, act_order=True) for b, g in MEDITRON]
         + [dict(bits=4, group_size=128, sym=False), dict(bits=3, group_size=32, sym=False, act_order=True),
            dict(bits=4, group_size=64, checkpoint_format="gptq_v2", sym=False),
            dict(bits=3, group_size=128, checkpoint_format="gptq_v2", act_order=True),
            dict(bits=2, group_size=32, sym=False), dict(bits=8, group_size=64, act_order=True, sym=False)])


def _id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_dequantize_reproduces_w(case):
    rng = np.random.default_rng(7)
    layer = make_layer(rng, 256, 96, **case)
    fmt = case.get("checkpoint_format", "gptq")
    W = quant.dequantize(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], case["bits"], fmt)
    assert W.dtype == np.float32 and W.shape == (256, 96)
    np.testing.assert_array_equal(W, layer["W"])


@pytest.mark.parametrize("n_in,n_out,bits,group_size", [
    (200, 40, 4, 64),     # in not a multiple of the group size: last group has 8 inputs
    (96, 33, 3, 64),      # out not a multiple of 32: qzeros' last word is partly padding
    (72, 8, 4, 32),
    (48, 16, 8, 32),
])
def test_odd_shapes(n_in, n_out, bits, group_size):
    rng = np.random.default_rng(n_in)
    for act_order in (False, True):
        layer = make_layer(rng, n_in, n_out, bits, group_size, act_order=act_order, sym=False)
        W = quant.dequantize(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits)
        np.testing.assert_array_equal(W, layer["W"])


def test_matmul_reference_equals_x_at_w_with_bias():
    rng = np.random.default_rng(3)
    layer = make_layer(rng, 128, 80, 4, 32, act_order=True, sym=False, bias=True)
    x = rng.normal(size=(5, 128)).astype(np.float32)                       # [N, in]
    y = quant.gptq_matmul_reference(x, layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4,
                                    bias=layer["bias"].astype(np.float32), columns_per_step=16)
    expected = x @ layer["W"] + layer["bias"].astype(np.float32)          # [N, out]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_gptq_linear_numpy_backend():
    rng = np.random.default_rng(4)
    layer = make_layer(rng, 96, 64, 3, 32, act_order=True)
    cfg = quant.parse_quant_config(quantize_config(3, 32, True), "quantize_config.json")
    lin = quant.GPTQLinear(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], cfg, 96, 64)
    x = rng.normal(size=(3, 96)).astype(np.float32)
    np.testing.assert_allclose(lin(x), x @ layer["W"], rtol=1e-5, atol=1e-5)
    assert lin.in_features == 96 and lin.out_features == 64
    assert lin.nbytes == layer["qweight"].nbytes + layer["qzeros"].nbytes + layer["scales"].nbytes + 96 * 4


# -- config ------------------------------------------------------------------------------------------------

def _write(directory, name, data):
    with open(os.path.join(directory, name), "w") as f:
        json.dump(data, f)


def test_read_quant_config_from_either_file(tmp_path):
    _write(tmp_path, "config.json", {"model_type": "llama"})
    assert quant.read_quant_config(str(tmp_path)) is None
    _write(tmp_path, "config.json", {"model_type": "llama", "quantization_config": quantize_config(3, 32, True)})
    cfg = quant.read_quant_config(str(tmp_path))
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym, cfg.checkpoint_format) == (3, 32, True, True, "gptq")
    _write(tmp_path, "quantize_config.json",
           {"bits": 3, "group_size": 32, "desc_act": True, "sym": False, "damp_percent": 0.1,
            "checkpoint_format": "gptq_v2"})
    cfg = quant.read_quant_config(str(tmp_path))
    assert cfg.sym is False and cfg.checkpoint_format == "gptq_v2" and cfg.damp_percent == 0.1
    assert cfg.source.endswith("quantize_config.json")
    # The two files must not disagree about how to read the tensors.
    _write(tmp_path, "quantize_config.json", quantize_config(4, 32, True))
    with pytest.raises(ConfigError, match="bits is 4 but"):
        quant.read_quant_config(str(tmp_path))


@pytest.mark.parametrize("change,message", [
    ({"bits": 5}, "bits 5 is not supported"),
    ({"bits": "4"}, "bits must be int"),
    ({"group_size": 0}, "group_size must be -1"),
    ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ({"desc_act": "yes"}, "desc_act must be bool"),
])
def test_bad_quant_config_names_the_file(tmp_path, change, message):
    block = quantize_config(4, 128, True)
    block.update(change)
    _write(tmp_path, "quantize_config.json", block)
    with pytest.raises(ConfigError, match=message) as e:
        quant.read_quant_config(str(tmp_path))
    assert "quantize_config.json" in str(e.value)


def test_missing_bits(tmp_path):
    _write(tmp_path, "quantize_config.json", {"group_size": 128})
    with pytest.raises(ConfigError, match="missing field 'bits'"):
        quant.read_quant_config(str(tmp_path))


# -- tensors that disagree ---------------------------------------------------------------------------------

def _layer_and_cfg(bits=4, group_size=32):
    layer = make_layer(np.random.default_rng(1), 128, 64, bits, group_size, act_order=True)
    cfg = quant.parse_quant_config(quantize_config(bits, group_size, True), "quantize_config.json")
    return layer, cfg


def _build(layer, cfg, n_in=128, n_out=64, **override):
    t = {k: layer[k] for k in ("qweight", "qzeros", "scales", "g_idx")}
    t.update(override)
    return quant.GPTQLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], cfg, n_in, n_out,
                            name="model.layers.0.mlp.up_proj", file="model.safetensors")


def test_consistent_layer_loads():
    layer, cfg = _layer_and_cfg()
    _build(layer, cfg)


@pytest.mark.parametrize("tensor,bad,message", [
    ("qweight", lambda L: L["qweight"][:-1], r"qweight has shape \[15, 64\], expected \[16, 64\]"),
    ("qweight", lambda L: L["qweight"].astype(np.int64), "qweight has dtype int64, expected int32"),
    ("scales", lambda L: L["scales"][:-1], r"scales has shape \[3, 64\], expected \[4, 64\]"),
    ("scales", lambda L: L["scales"].astype(np.float32), "scales has dtype float32"),
    ("qzeros", lambda L: L["qzeros"][:, :-1], r"qzeros has shape \[4, 7\], expected \[4, 8\]"),
    ("g_idx", lambda L: L["g_idx"][:-1], r"g_idx has shape \[127\], expected \[128\]"),
    ("g_idx", lambda L: np.where(np.arange(128) == 5, 4, L["g_idx"]).astype(np.int32),
     "g_idx holds group 4 at input 5, outside"),
    ("g_idx", lambda L: np.where(np.arange(128) == 9, -1, L["g_idx"]).astype(np.int32), "holds group -1"),
])
def test_inconsistent_tensors_are_a_clear_error(tensor, bad, message):
    layer, cfg = _layer_and_cfg()
    with pytest.raises(QuantError, match=message) as e:
        _build(layer, cfg, **{tensor: bad(layer)})
    text = str(e.value)
    assert "model.safetensors" in text and f"model.layers.0.mlp.up_proj.{tensor}" in text


def test_wrong_bits_in_config_is_caught_by_shapes():
    layer, _ = _layer_and_cfg(bits=4)
    cfg3 = quant.parse_quant_config(quantize_config(3, 32, True), "quantize_config.json")
    with pytest.raises(QuantError, match=r"expected \[12, 64\].*is the bits field of quantize_config.json"):
        _build(layer, cfg3)


def test_from_checkpoint(tmp_path):
    rng = np.random.default_rng(11)
    layer = make_layer(rng, 64, 32, 4, 32, act_order=True, sym=False, bias=True)
    p = "model.layers.0.self_attn.q_proj"
    write_safetensors(str(tmp_path / "model.safetensors"),
                      {f"{p}.qweight": layer["qweight"], f"{p}.qzeros": layer["qzeros"],
                       f"{p}.scales": layer["scales"], f"{p}.g_idx": layer["g_idx"], f"{p}.bias": layer["bias"]},
                      metadata={"format": "pt", "gptq_bits": "4"})
    ckpt = Checkpoint(str(tmp_path))
    cfg = quant.parse_quant_config(quantize_config(4, 32, True, sym=False), "quantize_config.json")
    lin = quant.GPTQLinear.from_checkpoint(ckpt, p, cfg, "numpy", 64, 32)
    assert lin.name == p and lin.tensor_names == [f"{p}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx",
                                                                       "bias")]
    x = rng.normal(size=(2, 64)).astype(np.float32)
    np.testing.assert_allclose(lin(x), x @ layer["W"] + layer["bias"].astype(np.float32), rtol=1e-5, atol=1e-5)
    # Metadata that contradicts the config is refused.
    cfg3 = quant.parse_quant_config(quantize_config(8, 32, True), "quantize_config.json")
    with pytest.raises(QuantError, match="gptq_bits=4"):
        quant.GPTQLinear.from_checkpoint(ckpt, p, cfg3, "numpy", 64, 32)
    with pytest.raises(QuantError, match="no quantize_config.json"):
        quant.GPTQLinear.from_checkpoint(ckpt, p, None, "numpy", 64, 32)
