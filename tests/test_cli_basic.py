"""The CLI on a tiny transformers checkpoint: through click's runner and as a real subprocess."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from hf_models import hf_greedy, hf_model
from tinyllama_ref.cli import main

PROMPT = [1, 17, 250, 3, 99]


@pytest.fixture(scope="module")
def ckpt(hf_checkpoints):
    return hf_checkpoints("f32", dtype="float32")


def test_generate_prompt_ids_matches_transformers(ckpt):
    ref = hf_greedy(hf_model(ckpt), PROMPT, 8)
    r = CliRunner().invoke(main, ["generate", ckpt, "--prompt-ids", ",".join(map(str, PROMPT)),
                                  "--max-new-tokens", "8", "--backend", "numpy", "--ignore-eos"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == ",".join(map(str, ref))


def run(*args):
    return subprocess.run([sys.executable, "-m", "tinyllama_ref", *args], capture_output=True, text=True,
                          timeout=300)


def test_subprocess_generate(ckpt):
    p = run("generate", ckpt, "--prompt-ids", "1,5,6", "--max-new-tokens", "3", "--ignore-eos")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip().splitlines()[-1].split(",")) == 3


@pytest.mark.parametrize("args, message", [
    (["generate", "/nonexistent/dir", "--prompt-ids", "1,2"], "no such checkpoint directory"),
    (["generate", "{ckpt}", "--prompt-ids", "1,99999"], "outside the model's vocabulary"),
    (["generate", "{ckpt}", "--prompt-ids", "1,2", "--temperature", "-1"], "temperature"),
])
def test_bad_input_is_one_line_no_traceback(ckpt, args, message):
    p = run(*[a.format(ckpt=ckpt) for a in args])
    assert p.returncode != 0
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_corrupt_config_is_clear(tmp_path, ckpt):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["hidden_size"]
    (bad / "config.json").write_text(json.dumps(cfg))
    p = run("generate", str(bad), "--prompt-ids", "1,2")
    assert p.returncode == 1 and "missing field 'hidden_size'" in p.stderr and "Traceback" not in p.stderr
