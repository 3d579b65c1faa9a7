"""GPTQ in NumPy (gptq.py) and the layer-by-layer quantizer (quantize.py).

Expectations come from outside the code under test: the algebra of the method (its loss is the Hessian
quadratic form of the final error; with a diagonal Hessian there is nothing to feed back, so it IS rounding to
nearest), a round-to-nearest baseline and an activation capture written here against transformers, the bit
stream packer of tests/gptq_packer.py, and quant.py's reader for loading.
"""

import json
import os
import shutil

import click
import numpy as np
import pytest
from click.testing import CliRunner

import tinyllama_ref
from gptq_packer import pack_stream_columns, pack_stream_rows, write_safetensors
from quantize_helpers import make_trained_llama, pattern_corpus, perplexity, rtn_quantize
from tinyllama_ref import quant
from tinyllama_ref.cli import Cli
from tinyllama_ref.cli.numerics import quantize as quantize_command
from tinyllama_ref.cli.numerics import verify as verify_command
from tinyllama_ref.errors import TinyLlamaError
from tinyllama_ref.make.gptq import gptq_quantize, hessian
from tinyllama_ref.make.quantize import quantize_checkpoint

SUBS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


# -- the algorithm on one matrix ------------------------------------------------------------------------------

def correlated_inputs(rng, n=1500, d=160, rank=12, dead=(7,)):
    """Rows living near a low-dimensional subspace (strong correlations between inputs), a few dead inputs."""
    x = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) + 0.05 * rng.normal(size=(n, d))
    x[:, list(dead)] = 0.0
    return x


def out_err(x, W, Wq):
    return float(np.linalg.norm(x @ (W - Wq).T))


SETTINGS = [(4, 32, True, True), (4, 128, False, True), (3, 32, True, False), (3, -1, False, False),
            (2, 64, True, False), (8, 32, True, True)]


@pytest.mark.parametrize("bits,group_size,act_order,sym", SETTINGS)
def test_gptq_beats_round_to_nearest_and_its_loss_is_the_hessian_form(bits, group_size, act_order, sym):
    rng = np.random.default_rng(bits * 100 + (group_size % 97))
    x = correlated_inputs(rng)
    W = rng.normal(size=(48, x.shape[1]))
    H = hessian(np.array_split(x, 7))
    assert np.allclose(H, 2 * x.T @ x / len(x))
    r = gptq_quantize(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order, damp_percent=0.01)
    Wq = r.dequantize()
    W_live = W.copy()
    W_live[:, 7] = 0.0                        # a dead input's weight is dropped, by design
    assert out_err(x, W_live, Wq) < 0.5 * out_err(x, W, rtn_quantize(W, bits, group_size, sym))
    # GPTQ's accumulated loss equals (W - Q) H' (W - Q)^T summed over rows, H' the dampened Hessian it used.
    Hd = H.copy()
    Hd[7, 7] = 1.0
    Hd[np.diag_indices_from(Hd)] += 0.01 * np.mean(np.diag(Hd))
    D = W_live - Wq
    assert 2 * r.loss == pytest.approx(np.sum((D @ Hd) * D), rel=1e-9)
    # Layout and ranges.
    G = 1 if group_size == -1 else -(-W.shape[1] // group_size)
    assert r.codes.shape == (W.shape[1], W.shape[0]) and r.codes.dtype == np.int32
    assert r.codes.min() >= 0 and r.codes.max() <= 2 ** bits - 1
    assert r.scales.shape == r.zeros.shape == (G, W.shape[0]) and r.scales.dtype == np.float16
    assert r.g_idx.shape == (W.shape[1],) and r.g_idx.dtype == np.int32
    if sym:
        assert np.all(r.zeros == 2 ** (bits - 1))


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (3, 16, False), (4, -1, False)])
def test_with_a_diagonal_hessian_gptq_is_round_to_nearest(bits, group_size, sym):
    # Uncorrelated inputs: H is diagonal, so the Cholesky factor of H^-1 is diagonal and no error is fed back.
    rng = np.random.default_rng(3)
    W = rng.normal(size=(24, 96))
    H = np.diag(rng.uniform(0.5, 2.0, size=96))
    r = gptq_quantize(W, H, bits=bits, group_size=group_size, sym=sym, act_order=False)
    np.testing.assert_array_equal(r.dequantize(), rtn_quantize(W, bits, group_size, sym))


def test_act_order_groups_follow_the_hessian_diagonal():
    rng = np.random.default_rng(5)
    x = correlated_inputs(rng, d=128) * rng.uniform(0.1, 3.0, size=128)     # very unequal input scales
    H = hessian([x])
    r = gptq_quantize(rng.normal(size=(16, 128)), H, bits=4, group_size=32, act_order=True)
    diag = np.diag(H)
    assert np.bincount(r.g_idx).tolist() == [32, 32, 32, 32]
    for g in range(3):                 # every input of group g matters at least as much as any of group g + 1
        assert diag[r.g_idx == g].min() >= diag[r.g_idx == g + 1].max()
    assert not np.all(np.diff(r.g_idx) >= 0)                                 # not the plain contiguous layout


def test_blocking_does_not_change_the_result():
    # The lazy batch update is an exact reordering of the same arithmetic.
    rng = np.random.default_rng(9)
    x = correlated_inputs(rng, d=96)
    W, H = rng.normal(size=(20, 96)), hessian([x])
    a = gptq_quantize(W, H, bits=4, group_size=32, act_order=True, block_size=96)
    b = gptq_quantize(W, H, bits=4, group_size=32, act_order=True, block_size=16)
    assert np.mean(a.codes == b.codes) > 0.999
    np.testing.assert_allclose(a.dequantize(), b.dequantize(), atol=float(a.scales.max()) * 1.01)


def test_bad_settings_are_refused():
    H = np.eye(8)
    with pytest.raises(TinyLlamaError, match="bits must be"):
        gptq_quantize(np.ones((2, 8)), H, bits=5)
    with pytest.raises(TinyLlamaError, match="Hessian has shape"):
        gptq_quantize(np.ones((2, 9)), H)
    with pytest.raises(TinyLlamaError, match="calibration data"):
        hessian([])


# -- the driver on a tiny trained model ----------------------------------------------------------------------

CALIBRATION = [pattern_corpus(seed=s, n_tokens=128) for s in range(12)]
HELD_OUT = pattern_corpus(seed=1000, n_tokens=240)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_trained_llama(str(tmp_path_factory.mktemp("trained") / "dense"))


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
    """quantize_checkpoint outputs for a few settings, with every GPTQResult the algorithm produced."""
    made = {}

    def get(bits, group_size, act_order, sym, fmt="gptq"):
        key = (bits, group_size, act_order, sym, fmt)
        if key not in made:
            out = str(tmp_path_factory.mktemp("q") / "gptq")
            results = {}
            errors = quantize_checkpoint(trained, out, CALIBRATION, bits=bits, group_size=group_size,
                                         act_order=act_order, sym=sym, checkpoint_format=fmt,
                                         on_result=lambda i, k, r, W: results.__setitem__((i, k), r))
            made[key] = out, results, errors
        return made[key]
    return get


def linear_inputs(path, seqs):
    """The input rows of every linear of the DENSE model on the calibration text, captured from transformers."""
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    captured, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for key, sub in SUBS.items():
            module = layer.get_submodule(sub)
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=(i, key): captured.setdefault(name, []).append(args[0][0].numpy().copy())))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny matrices: one thread is as fast and immune to a busy machine
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s]))
    torch.set_num_threads(threads)
    weights = {(i, key): layer.get_submodule(sub).weight.detach().numpy().astype(np.float64)
               for i, layer in enumerate(model.model.layers) for key, sub in SUBS.items()}
    return {k: np.concatenate(v).astype(np.float64) for k, v in captured.items()}, weights


def read_file_tensors(path):
    from safetensors.numpy import load_file
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("bits,group_size,act_order,sym", [(4, 32, True, True), (3, 32, True, False)])
def test_each_linear_beats_round_to_nearest_on_the_same_grid(trained, quantized, bits, group_size, act_order,
                                                             sym):
    out, _, _ = quantized(bits, group_size, act_order, sym)
    inputs, weights = linear_inputs(trained, CALIBRATION)
    tensors = read_file_tensors(out)
    for (i, key), W in weights.items():
        p = f"model.layers.{i}.{SUBS[key]}"
        s, g = tensors[p + ".scales"].astype(np.float64), tensors[p + ".g_idx"]
        zero = quant.true_zeros(quant.unpack_zeros(tensors[p + ".qzeros"], bits, W.shape[0]), bits, "gptq")
        W_gptq = quant.dequantize(tensors[p + ".qweight"], tensors[p + ".qzeros"], tensors[p + ".scales"], g,
                                  bits).T.astype(np.float64)                                      # [out, in]
        # Round to nearest on GPTQ's own grid (its scales, zeros and groups) and on a min-max grid of its own.
        codes = np.clip(np.round(W.T / s[g]) + zero[g], 0, 2 ** bits - 1)                       # [in, out]
        W_rtn_same = (s[g] * (codes - zero[g])).T
        W_rtn = rtn_quantize(W, bits, group_size, sym)
        x = inputs[(i, key)]
        e = out_err(x, W, W_gptq)
        assert e < 0.7 * out_err(x, W, W_rtn_same), (i, key)
        assert e < 0.7 * out_err(x, W, W_rtn), (i, key)


@pytest.mark.parametrize("bits,group_size,act_order,sym,fmt", [(4, 32, True, True, "gptq"),
                                                               (3, 32, True, False, "gptq"),
                                                               (4, -1, False, False, "gptq_v2")])
def test_written_file_equals_the_independent_packer_byte_for_byte(trained, quantized, tmp_path, bits, group_size,
                                                                  act_order, sym, fmt):
    out, results, _ = quantized(bits, group_size, act_order, sym, fmt)
    tensors = read_file_tensors(out)
    dense = tinyllama_ref.checkpoint.Checkpoint(trained)
    expected = {}
    for (i, key), r in results.items():
        p = f"model.layers.{i}.{SUBS[key]}"
        stored = (r.zeros - 1) % 2 ** bits if fmt == "gptq" else r.zeros     # docs/formats.md: v1 stores zero - 1
        want = {"qweight": pack_stream_columns(r.codes, bits), "qzeros": pack_stream_rows(stored, bits),
                "scales": r.scales.astype(np.float16), "g_idx": r.g_idx.astype(np.int32)}
        for t, array in want.items():
            got = tensors[f"{p}.{t}"]
            assert got.dtype == array.dtype and got.shape == array.shape, (p, t)
            assert got.tobytes() == array.tobytes(), (p, t)
            expected[f"{p}.{t}"] = array
    for name in dense.tensors:
        if not name.endswith("_proj.weight"):
            expected[name] = dense.f32(name).astype(np.float16)
            assert tensors[name].tobytes() == expected[name].tobytes(), name
    assert set(tensors) == set(expected)
    # The whole file: the test-side writer, given the same tensors in the same order and the same metadata,
    # produces the identical bytes (header, offsets, padding, data).
    path = os.path.join(out, "model.safetensors")
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    order = [n for n in header if n != "__metadata__"]
    write_safetensors(str(tmp_path / "packer.safetensors"), {n: expected[n] for n in order},
                      metadata=header["__metadata__"])
    assert (tmp_path / "packer.safetensors").read_bytes() == open(path, "rb").read()
    qc = json.load(open(os.path.join(out, "quantize_config.json")))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert qc == cfg["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"], qc["checkpoint_format"]) == \
        (bits, group_size, act_order, sym, fmt)
    assert quant.read_quant_config(out).bits == bits


@pytest.mark.parametrize("bits,group_size,act_order,sym,margin", [(4, 32, True, True, 0.03),
                                                                  (3, 32, True, False, 0.05)])
def test_quantized_model_loads_generates_and_keeps_perplexity(trained, quantized, bits, group_size, act_order,
                                                              sym, margin):
    out, _, errors = quantized(bits, group_size, act_order, sym)
    dense = tinyllama_ref.load(trained, backend="numpy")
    model = tinyllama_ref.load(out, backend="numpy")
    assert model.quant_config.bits == bits
    ppl_dense, ppl_q = perplexity(dense, HELD_OUT), perplexity(model, HELD_OUT)
    assert ppl_dense < 2.0                            # the tiny model did learn the pattern language
    assert abs(ppl_q - ppl_dense) / ppl_dense < margin, (ppl_dense, ppl_q)
    prompt = HELD_OUT[:12]
    text = model.generate(prompt, max_new_tokens=24, stop_ids=[])
    assert len(text) == 24 and all(0 <= t < model.cfg.vocab_size for t in text)
    # Where the dense model is sure of the next token, the quantized one picks the same.
    ld, lq = dense.logits(HELD_OUT), model.logits(HELD_OUT)
    top2 = np.sort(ld, axis=-1)[:, -2:]
    sure = (top2[:, 1] - top2[:, 0]) > 3.0
    assert sure.sum() > 100 and np.all(ld[sure].argmax(-1) == lq[sure].argmax(-1))
    assert np.mean(ld.argmax(-1) == lq.argmax(-1)) > 0.97
    assert all(0 < e < 0.02 for layer in errors.values() for e in layer.values())


def test_verify_passes_on_a_quantized_checkpoint(quantized):
    from tinyllama_ref.measure.verify import compare, format_report
    out, _, _ = quantized(3, 32, True, False)
    report = compare(out, HELD_OUT[:20])
    assert report.passed, format_report(report)


# -- the command ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app():
    @click.group(cls=Cli)
    def group():
        pass
    group.add_command(quantize_command)
    group.add_command(verify_command)
    return group


def test_cli_quantize_with_ids_file(app, trained, tmp_path):
    ids_file = tmp_path / "calib.txt"
    ids_file.write_text("\n".join(",".join(map(str, s)) for s in CALIBRATION[:6]))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["quantize", trained, str(out), "--bits", "4", "--group-size", "32", "--act-order",
                                 "--calibration-ids", str(ids_file)])
    assert r.exit_code == 0, r.output
    assert "layer 1/2 [#######] done" in r.output and "layer 2/2 [#######] done" in r.output
    assert f"wrote {out}" in r.output
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "quantize_config.json"]
    model = tinyllama_ref.load(str(out), backend="numpy")
    assert len(model.generate(HELD_OUT[:8], max_new_tokens=5, stop_ids=[])) == 5
    again = CliRunner().invoke(app, ["quantize", trained, str(out), "--calibration-ids", str(ids_file)])
    assert again.exit_code == 1 and "not empty" in again.output
    neither = CliRunner().invoke(app, ["quantize", trained, str(tmp_path / "o2")])
    assert neither.exit_code == 2 and "exactly one of --calibration" in neither.output
    bad = tmp_path / "bad.txt"
    bad.write_text("1,2,x\n")
    r = CliRunner().invoke(app, ["quantize", trained, str(tmp_path / "o3"), "--calibration-ids", str(bad)])
    assert r.exit_code == 1 and r.output.startswith("error:") and "bad.txt" in r.output
    big = tmp_path / "big.json"
    big.write_text(json.dumps([[1, 2, 96]]))
    r = CliRunner().invoke(app, ["quantize", trained, str(tmp_path / "o4"), "--calibration-ids", str(big)])
    assert r.exit_code == 1 and "token id 96 is outside the vocabulary" in r.output


def test_cli_quantize_bf16_with_text_calibration_then_verify_with_a_text_prompt(app, hf_checkpoints, tmp_path):
    from tinyllama_ref.make.tokenizer_files import generate_text, write_tokenizer_files
    dense = tmp_path / "dense"
    shutil.copytree(hf_checkpoints("bf16-quantize-text", dtype="bfloat16", vocab=512, hidden=64), dense)
    write_tokenizer_files(str(dense), 512)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(generate_text(60, 200, seed=4)))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["quantize", str(dense), str(out), "--bits", "3", "--group-size", "32",
                                 "--asym", "--calibration", str(text), "--seq-len", "64", "--n-samples", "8",
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    assert "layer" not in r.output
    assert {"tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(out))
    v = CliRunner().invoke(app, ["verify", str(out), "--prompt", "Ka thoro brae, 12 mg"])
    assert v.exit_code == 0 and "PASS" in v.output, v.output


def test_an_interrupted_run_leaves_no_complete_looking_file(trained, tmp_path, monkeypatch):
    import tinyllama_ref.make.quantize as driver
    real = driver.gptq_quantize
    calls = []

    def failing(W, H, **kw):
        calls.append(1)
        if len(calls) == 9:                                   # the second layer's k_proj
            raise KeyboardInterrupt
        return real(W, H, **kw)
    monkeypatch.setattr(driver, "gptq_quantize", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(trained, str(out), CALIBRATION[:2], bits=4, group_size=32)
    assert "model.safetensors" not in os.listdir(out) and "model.safetensors.partial" in os.listdir(out)


def test_the_drivers_layer_forward_matches_transformers(trained):
    # quantize_layer's own attention / MLP forward (used to feed each layer its input): at 8 bits the quantized
    # layer's output must be transformers' dense layer output up to the (small) 8-bit error.
    import torch
    from transformers import LlamaForCausalLM
    from tinyllama_ref.checkpoint import Checkpoint
    from tinyllama_ref.config import load_config
    from tinyllama_ref.ops import rope_tables
    from tinyllama_ref.make.quantize import quantize_layer, read_dense_layer
    seqs = [np.array(s[:64]) for s in CALIBRATION[:3]]
    hf = LlamaForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [hf(torch.from_numpy(s[None]), output_hidden_states=True).hidden_states for s in seqs]
    ckpt, cfg = Checkpoint(trained), load_config(trained)
    cos, sin = rope_tables(64, cfg.head_dim, cfg.rope_theta)
    x = np.concatenate([h[0][0].numpy() for h in ref])                                  # [N, D] embeddings
    want = np.concatenate([h[1][0].numpy() for h in ref])                               # [N, D] after layer 0
    rel = {}
    for bits in (8, 3):
        out, _, _ = quantize_layer(x, [64] * 3, read_dense_layer(ckpt, cfg, 0), cfg, cos, sin,
                                   dict(bits=bits, group_size=32, sym=False, act_order=True, damp_percent=0.01))
        rel[bits] = np.abs(out - want).max() / np.abs(want).max()
    assert rel[8] < 5e-3 and rel[3] > 5 * rel[8], rel   # measured: 1.8e-3 and 5.3e-2
