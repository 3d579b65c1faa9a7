"""lm-evaluation-harness's own command line with our backend, and `tinyllama-ref lm-eval` passing lm-eval's
options through; --apply_chat_template against lm-eval's hf backend on the same tiny model.

Offline: local JSONL tasks (tests/test_eval_harness.py's write_tasks), a checkpoint made here, HF_*_OFFLINE.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from eval_checkpoint import VOCAB  # noqa: E402
from hf_models import make_hf_llama  # noqa: E402
from test_chat_templates import GEMMA, LLAMA2_CHAT, MISTRAL_INSTRUCT, QWEN2_CHATML, ZEPHYR  # noqa: E402
from test_eval_harness import write_tasks  # noqa: E402
from tinyllama_ref.make.tokenizer_files import write_tokenizer_files  # noqa: E402

MAX_LENGTH = 96
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama whose tokenizer_config.json holds Llama-2-chat's template ("legacy" written out: see
    tests/test_chat_templates.py), and the local tasks."""
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)
    ckpt = str(tmp_path_factory.mktemp("lm_eval_cli_ckpt"))
    make_hf_llama(ckpt, vocab=VOCAB, layers=2, hidden=64, max_pos=512, seed=1)
    write_tokenizer_files(ckpt, VOCAB, seed=3, chat_template=LLAMA2_CHAT, legacy=False)
    tasks = write_tasks(str(tmp_path_factory.mktemp("lm_eval_cli_tasks")))
    return ckpt, tasks


def run_both(setup, tasks, hf_too=True, **kwargs):
    """simple_evaluate with our backend and with lm-eval's hf backend (unless not hf_too), samples kept."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer, LlamaForCausalLM
    from tinyllama_ref.eval.harness import TinyLlamaLM
    ckpt, task_dir = setup
    lms = [TinyLlamaLM(ckpt, backend="numpy", max_length=MAX_LENGTH, batch_tokens=400)]
    if hf_too:
        lms.append(HFLM(pretrained=LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(),
                        tokenizer=AutoTokenizer.from_pretrained(ckpt), backend="causal", add_bos_token=True,
                        batch_size=1, max_length=MAX_LENGTH))
    return [lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=task_dir),
                                    log_samples=True, **kwargs) for lm in lms]


def same_generation(a, b):
    """Equal strings. Where the tiny model emits byte pieces that are not UTF-8, SentencePiece (tokenizer.py)
    writes U+FFFD per invalid byte, and transformers' tokenizers (ByteFallback) one per byte of the whole
    run: there a U+FFFD on either side stands for that one character."""
    return a == b or (len(a) == len(b) and all(x == y or "\ufffd" in (x, y) for x, y in zip(a, b)))


@pytest.mark.parametrize("chat", [
    {},
    {"apply_chat_template": True, "system_instruction": "Answer briefly."},
    {"apply_chat_template": True, "num_fewshot": 2, "fewshot_as_multiturn": True},
], ids=["plain", "chat+system", "chat+multiturn"])
def test_chat_template_runs_match_the_hf_backend(setup, chat):
    ours, hf = run_both(setup, ["tl_mc", "tl_gen"], limit=4, **chat)
    for task in ("tl_mc", "tl_gen"):
        a, b = ours["samples"][task], hf["samples"][task]
        assert [s["arguments"] for s in a] == [s["arguments"] for s in b]      # the same prompts
        if chat:
            assert all(s["arguments"][0][0].startswith("<s>[INST] ") for s in a)
        for x, y in zip(a, b):
            if task == "tl_gen":
                assert same_generation(x["resps"][0][0], y["resps"][0][0])
            else:
                for (u,), (v,) in zip(x["resps"], y["resps"]):
                    assert u[0] == pytest.approx(v[0], rel=1e-4) and u[1] == v[1]
    assert ours["results"]["tl_mc"]["acc,none"] == hf["results"]["tl_mc"]["acc,none"]


def lm_eval_results(out_dir):
    found = glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True)
    assert len(found) == 1, found
    return json.loads(open(found[0]).read())


def lm_eval_samples(out_dir, task):
    found = glob.glob(os.path.join(out_dir, "**", f"samples_{task}_*.jsonl"), recursive=True)
    assert len(found) == 1, found
    return [json.loads(line) for line in open(found[0])]


def test_lm_eval_command_line_finds_tinyllama_ref(setup, tmp_path):
    """`python -m lm_eval --model tinyllama-ref ...` in a fresh interpreter (nothing of ours imported first):
    the registry knows the name, and the results file it writes holds our backend's numbers."""
    ckpt, tasks = setup
    out = str(tmp_path / "out")
    args = [sys.executable, "-m", "lm_eval", "--model", "tinyllama-ref",
            "--model_args", f"pretrained={ckpt},backend=numpy,max_length={MAX_LENGTH}",
            "--tasks", "tl_mc", "--include_path", tasks, "--limit", "4", "--log_samples", "--output_path", out,
            "--apply_chat_template", "--system_instruction", "Answer briefly."]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE},
                       cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    got = lm_eval_results(out)
    assert got["config"]["model"] == "tinyllama-ref"
    assert got["config"]["checkpoint"] == ckpt and got["config"]["backend"] == "numpy"     # get_model_info
    assert got["chat_template"] == LLAMA2_CHAT and got["system_instruction"] == "Answer briefly."
    samples = lm_eval_samples(out, "tl_mc")
    assert len(samples) == 4
    (ours,) = run_both(setup, ["tl_mc"], hf_too=False, limit=4, apply_chat_template=True,
                       system_instruction="Answer briefly.")
    assert got["results"]["tl_mc"]["acc,none"] == ours["results"]["tl_mc"]["acc,none"]
    for s, t in zip(samples, ours["samples"]["tl_mc"]):
        # The file spells each request's arguments {"gen_args_0": {"arg_0": context, "arg_1": continuation}}.
        assert [[a["arg_0"], a["arg_1"]] for a in s["arguments"].values()] == [list(a) for a in t["arguments"]]
        for (u,), (v,) in zip(s["resps"], t["resps"]):
            assert float(u[0]) == pytest.approx(v[0], rel=1e-5)


def test_start_up_hook_imports_nothing_of_ours(tmp_path):
    """The .pth hook costs a finder, not an import: tinyllama_ref and lm_eval stay unloaded until asked for."""
    code = ("import sys; print(sorted(m for m in sys.modules if m.startswith(('tinyllama_ref', 'lm_eval'))));"
            "from lm_eval.api.registry import get_model; print(get_model('tinyllama_ref').__name__, "
            "get_model('hf').__name__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path), env={**os.environ, **OFFLINE})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split("\n")[:2] == ["[]", "TinyLlamaLM HFLM"]


def test_our_command_passes_lm_eval_options_through(setup, tmp_path):
    """--log_samples, --output_path, --limit (and --include-path spelled with "-") reach lm-eval's parser;
    -o still writes the results dict and the resumable answer log."""
    from click.testing import CliRunner
    from tinyllama_ref.cli import main
    ckpt, tasks = setup
    out, res = str(tmp_path / "out"), tmp_path / "r.json"
    r = CliRunner().invoke(main, ["lm-eval", ckpt, "--backend", "numpy", "--max-length", str(MAX_LENGTH),
                                  "--tasks", "tl_mc", "--include-path", tasks, "--limit", "3", "--log_samples",
                                  "--output_path", out, "-o", str(res), "-q"])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    written = lm_eval_results(out)
    assert len(lm_eval_samples(out, "tl_mc")) == 3
    assert written["n-samples"]["tl_mc"]["effective"] == 3
    assert json.loads(res.read_text())["results"]["tl_mc"] == written["results"]["tl_mc"]
    assert len((tmp_path / "r.json.requests.jsonl").read_text().splitlines()) > 3   # header + every request
    assert "tl_mc" in r.output                                                     # lm-eval's own table


def test_model_options_are_ours(setup):
    from click.testing import CliRunner
    from tinyllama_ref.cli import main
    from tinyllama_ref.cli.lm_eval import harness_argv
    assert harness_argv(["--include-path", "x", "--num-fewshot=2", "-s", "--gen_kwargs", "a=1"], "") == \
        ["--include_path", "x", "--num_fewshot=2", "-s", "--gen_kwargs", "a=1"]
    for bad in (["--model", "hf"], ["--model_args", "pretrained=x"], ["-a", "x"]):
        r = CliRunner().invoke(main, ["lm-eval", setup[0], "--tasks", "tl_mc", *bad])
        assert r.exit_code == 1 and "this command sets the model" in r.output, r.output


def test_registered_name_and_chat_hooks(setup):
    from lm_eval.api.registry import get_model
    from tinyllama_ref.eval.harness import TinyLlamaLM
    assert get_model("tinyllama-ref") is TinyLlamaLM and get_model("tinyllama_ref") is TinyLlamaLM
    ckpt = setup[0]
    lm = TinyLlamaLM(ckpt, backend="numpy", template="chatml")
    assert lm.chat_template(True) == "chatml" and lm.chat_template(False) is None
    assert "/" not in lm.tokenizer_name
    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert lm.apply_chat_template(history) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n" \
                                              "<|im_start|>assistant\n"
    own = TinyLlamaLM(ckpt, backend="numpy", model=lm.tl_model)
    assert own.template == "checkpoint" and own.chat_template(True) == LLAMA2_CHAT
    # Llama-2's template refuses a conversation that starts with the assistant; as hf, no second chance
    # helps there, and the error names the file.
    from tinyllama_ref.templates import ChatTemplateError
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json"):
        own.apply_chat_template([{"role": "assistant", "content": "A"}])


@pytest.mark.parametrize("template", [MISTRAL_INSTRUCT, GEMMA, QWEN2_CHATML, ZEPHYR, LLAMA2_CHAT],
                         ids=["mistral", "gemma", "qwen2", "zephyr", "llama2"])
def test_apply_chat_template_is_the_hf_backends(setup, tmp_path, template):
    """TinyLlamaLM.apply_chat_template and HFLM's on the same histories: with a system message (which
    Mistral's and Gemma's templates refuse, so both try again without it) and ending in an assistant turn
    (continue_final_message)."""
    import shutil
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, LlamaForCausalLM
    from tinyllama_ref.eval.harness import TinyLlamaLM
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(setup[0], ckpt)
    config_path = os.path.join(ckpt, "tokenizer_config.json")
    config = json.loads(open(config_path).read())
    config["chat_template"] = template
    with open(config_path, "w") as f:
        json.dump(config, f)
    ours = TinyLlamaLM(ckpt, backend="numpy")
    hf = HFLM(pretrained=LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(),
              tokenizer=AutoTokenizer.from_pretrained(ckpt), backend="causal", add_bos_token=True, batch_size=1)
    histories = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: fever?\nA:"}],
        [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
        [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "The answer is"}],
    ]
    for history in histories:
        gen = history[-1]["role"] == "user"
        assert ours.apply_chat_template(history, gen) == hf.apply_chat_template(history, gen)
