"""verify: our layers against transformers' LlamaDecoderLayer, one at a time, on the same weights."""

import dataclasses
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner

from quantize_helpers import make_gptq_checkpoint
from tinyllama_ref.measure import verify as verify_mod
from tinyllama_ref.cli import Cli
from tinyllama_ref.cli.numerics import verify as verify_command

PROMPT = [1, 17, 250, 3, 99, 4, 180, 42, 7, 311, 64, 5]


@pytest.fixture(scope="module")
def app():
    @click.group(cls=Cli)
    def group():
        pass
    group.add_command(verify_command)
    return group


def run(app, *args):
    return CliRunner().invoke(app, ["verify", *args])


@pytest.mark.parametrize("dtype,backend", [("float32", "numpy"), ("float16", "numpy"), ("bfloat16", "numpy"),
                                           ("float32", "numba")])
def test_dense_checkpoints_pass(hf_checkpoints, dtype, backend):
    path = hf_checkpoints(f"verify-{dtype}", dtype=dtype, layers=3, seed=7)
    report = verify_mod.compare(path, PROMPT, backend=backend)
    assert report.passed, verify_mod.format_report(report)
    assert [r.index for r in report.layers] == [0, 1, 2]
    assert report.logits.top1 == 1.0 and report.first_diverging_layer is None
    for r in report.layers:                      # far inside the tolerance: float32 round-off only
        assert r.rel < 1e-5 and r.local_rel < 1e-5 and r.cos > 1 - 1e-9
    assert report.logits.kl < 1e-9
    import torch
    assert torch.is_grad_enabled()               # verify must not switch autograd off for the rest of a program


def test_linear_rope_scaling_and_tied_embeddings_pass(hf_checkpoints):
    path = hf_checkpoints("verify-rope-tied", dtype="float32", rope_factor=2.0, tie=True, seed=3)
    report = verify_mod.compare(path, list(range(1, 120, 2)))
    assert report.passed, verify_mod.format_report(report)


@pytest.mark.parametrize("bits,group_size,act_order,sym,fmt", [
    (4, 32, True, True, "gptq"),
    (3, 32, True, False, "gptq"),
    (4, -1, False, False, "gptq_v2"),
])
def test_gptq_checkpoints_from_the_test_packer_pass(hf_checkpoints, tmp_path, bits, group_size, act_order, sym,
                                                    fmt):
    dense = hf_checkpoints("verify-float32", dtype="float32", layers=3, seed=7)
    path = make_gptq_checkpoint(dense, str(tmp_path / "gptq"), bits, group_size, act_order, sym, fmt, seed=bits)
    report = verify_mod.compare(path, PROMPT, backend="numpy")
    assert report.kind.startswith(f"GPTQ {bits}-bit")
    assert report.passed, verify_mod.format_report(report)


def _perturb_layer(monkeypatch, index, scale=1.001):
    """Make OUR block compute layer `index` with its MLP norm weight off by `scale`; transformers is untouched."""
    original = verify_mod.block

    def altered(x, w, *args):
        if w.index == index:
            w = dataclasses.replace(w, ffn_norm=w.ffn_norm * np.float32(scale))
        return original(x, w, *args)
    monkeypatch.setattr(verify_mod, "block", altered)


@pytest.mark.parametrize("index", [0, 1])
def test_altered_layer_fails_and_is_named(hf_checkpoints, monkeypatch, index):
    path = hf_checkpoints("verify-float32", dtype="float32", layers=3, seed=7)
    _perturb_layer(monkeypatch, index)
    report = verify_mod.compare(path, PROMPT)
    assert not report.passed
    assert report.first_diverging_layer == index
    assert all(r.ok(report.tolerance) for r in report.layers[:index])
    assert not report.layers[index].ok(report.tolerance)


def test_cli_prints_table_and_exit_codes(app, hf_checkpoints, monkeypatch):
    path = hf_checkpoints("verify-float32", dtype="float32", layers=3, seed=7)
    good = run(app, path, "--prompt-ids", ",".join(map(str, PROMPT)))
    assert good.exit_code == 0, good.output
    assert "layer 3/3: rel diff" in good.output                # progress on stderr as each layer is measured
    assert "| 2 |" in good.output and "KL" in good.output and good.output.strip().endswith(
        "PASS: every layer and the logits agree with transformers within tolerance")
    _perturb_layer(monkeypatch, 1)
    bad = run(app, path, "--prompt-ids", ",".join(map(str, PROMPT)))
    assert bad.exit_code == 1
    assert "FAIL: layer 1 is the first to diverge from transformers" in bad.output


def test_cli_needs_exactly_one_prompt(app, hf_checkpoints):
    path = hf_checkpoints("verify-float32", dtype="float32", layers=3, seed=7)
    r = run(app, path)
    assert r.exit_code == 2 and "exactly one of --prompt" in r.output


def test_missing_torch_is_a_clear_one_line_error(app, hf_checkpoints, monkeypatch):
    path = hf_checkpoints("verify-float32", dtype="float32", layers=3, seed=7)
    monkeypatch.setitem(sys.modules, "torch", None)          # `import torch` now raises ImportError
    with pytest.raises(verify_mod.VerifyDependencyError, match=r"pip install -e '\.\[verify\]'"):
        verify_mod.compare(path, PROMPT)
    r = run(app, path, "--prompt-ids", "1,2,3")
    assert r.exit_code == 1
    assert r.output.startswith("error: verify needs PyTorch and transformers: pip install -e '.[verify]' in the "
                               "tinyllama-ref source directory")
    assert "Traceback" not in r.output


def test_python_dash_m_inside_the_checkout(hf_checkpoints):
    """`python -m tinyllama_ref verify` run from the checkout itself: its kernels/ folder must not stand in for
    Hugging Face's `kernels` package, which transformers 5 imports (that failed with an ImportError)."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}    # as a user's shell runs it
    r = subprocess.run([sys.executable, "-m", "tinyllama_ref", "verify", hf_checkpoints("m_dash", dtype="float32"),
                        "--prompt-ids", "1,5,9,2"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PASS" in r.stdout
