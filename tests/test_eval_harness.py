"""TinyLlamaLM against lm-evaluation-harness's own `hf` backend (HFLM, add_bos_token=True) on the same tiny
dense checkpoint, offline: local task YAMLs (`dataset_path: json`, local `data_files`) written here."""

import json
import os
import random

import pytest

lm_eval = pytest.importorskip("lm_eval")

from eval_checkpoint import make_eval_checkpoint  # noqa: E402
from tinyllama_ref.make.tokenizer_files import generate_text  # noqa: E402

MAX_LENGTH = 64          # small, so rolling windows and left truncation both happen
TASKS = ["tl_mc", "tl_ppl", "tl_gen"]


def hf_backend_class():
    """lm_eval.models.huggingface.HFLM, the harness's own transformers backend: the peer of these tests."""
    from lm_eval.models.huggingface import HFLM
    return HFLM


def write_tasks(root):
    """Three tasks over local JSONL: multiple choice, rolling perplexity, generation with stop strings."""
    sents = generate_text(80, 300, seed=5)
    rng = random.Random(1)
    data = {
        "mc": [{"question": sents[i][:rng.randint(20, 80)],        # some end mid-word or with a space
                "choices": [sents[20 + 3 * i + j][:rng.randint(3, 30)].strip() or "x"
                            for j in range(rng.randint(2, 4))], "answer": 0} for i in range(10)],
        "ppl": [{"text": " ".join(sents[40 + 5 * i:41 + 5 * i + i % 4])} for i in range(5)],
        "gen": [{"prompt": sents[60 + i][:35 + 3 * i], "target": "x"} for i in range(5)],
    }
    for row in data["mc"]:
        row["answer"] = rng.randrange(len(row["choices"]))
    for name, rows in data.items():
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    yamls = {
        "mc": "task: tl_mc\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
              "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
              "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "ppl": "task: tl_ppl\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
               "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
               "  - metric: bits_per_byte\n",
        "gen": "task: tl_gen\noutput_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
               "generation_kwargs:\n  until: [\".\", \"\\n\"]\n  max_gen_toks: 10\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n",
    }
    for name, text in yamls.items():
        with open(os.path.join(root, f"{name}.yaml"), "w") as f:
            f.write(head.format(os.path.join(root, f"{name}.jsonl")) + text)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ckpt = make_eval_checkpoint(str(tmp_path_factory.mktemp("eval_harness_ckpt")))
    tasks = write_tasks(str(tmp_path_factory.mktemp("eval_harness_tasks")))
    return ckpt, tasks


@pytest.fixture(scope="module")
def runs(setup):
    """simple_evaluate with both backends, every request's answer kept (log_samples)."""
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer, LlamaForCausalLM
    from tinyllama_ref.eval.harness import TinyLlamaLM
    ckpt, tasks = setup
    ours = TinyLlamaLM(ckpt, backend="numpy", max_length=MAX_LENGTH, batch_tokens=200)
    hf = hf_backend_class()(pretrained=LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(),
                            tokenizer=AutoTokenizer.from_pretrained(ckpt), backend="causal", add_bos_token=True,
                            batch_size=1, max_length=MAX_LENGTH)
    out = {}
    for name, lm in (("ours", ours), ("hf", hf)):
        out[name] = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=TaskManager(include_path=tasks),
                                            log_samples=True, num_fewshot=None)
    out["lms"] = (ours, hf)
    return out


def responses(run, task):
    return [s["resps"] for s in run["samples"][task]]


def test_multiple_choice_logliks_and_accuracies_match_hf(runs):
    ours, hf = responses(runs["ours"], "tl_mc"), responses(runs["hf"], "tl_mc")
    assert len(ours) == len(hf) == 10
    for a, b in zip(ours, hf):
        assert len(a) == len(b)
        for (x,), (y,) in zip(a, b):
            assert x[0] == pytest.approx(y[0], rel=1e-4)
            assert x[1] == y[1]                                   # is_greedy
    ra, rb = runs["ours"]["results"]["tl_mc"], runs["hf"]["results"]["tl_mc"]
    assert ra["acc,none"] == rb["acc,none"] and ra["acc_norm,none"] == rb["acc_norm,none"]


def test_rolling_loglikelihood_and_perplexities_match_hf(runs):
    ours, hf = responses(runs["ours"], "tl_ppl"), responses(runs["hf"], "tl_ppl")
    for (a,), (b,) in zip(ours, hf):
        assert a == pytest.approx(b, rel=1e-4)
    ra, rb = runs["ours"]["results"]["tl_ppl"], runs["hf"]["results"]["tl_ppl"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ra[metric] == pytest.approx(rb[metric], rel=1e-4)


def test_rolling_windows_are_the_harness_windows(runs, setup):
    """More than one window per text at MAX_LENGTH, so the windowing is exercised, and each text's value is
    the sum over utils.get_rolling_token_windows of the continuation log-likelihoods."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    ours = runs["lms"][0]
    docs = [json.loads(line)["text"] for line in open(os.path.join(setup[1], "ppl.jsonl"))]
    n_windows = []
    for text, resps in zip(docs, responses(runs["ours"], "tl_ppl")):
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ours.tok_encode(text),
                                                                              ours.prefix_token_id, MAX_LENGTH, 1)]
        n_windows.append(len(windows))
        total = sum(ll for ll, _ in ours._loglikelihood_tokens([(None, c, t) for c, t in windows]))
        assert total == pytest.approx(resps[0][0], rel=1e-6)     # other batches: other rounding
    assert max(n_windows) > 2


def test_generate_until_gives_hf_greedy_strings(runs):
    ours, hf = responses(runs["ours"], "tl_gen"), responses(runs["hf"], "tl_gen")
    assert ours == hf
    for ((text,),) in ours:
        assert "." not in text and "\n" not in text               # cut at the first `until` string


def test_generate_until_honours_max_gen_toks(runs):
    """3 new tokens give the start of what 10 give, and the same strings as hf."""
    from lm_eval.api.instance import Instance
    ours, hf = runs["lms"]
    prompts = [s["doc"]["prompt"] for s in runs["ours"]["samples"]["tl_gen"]]

    def requests(n):
        return [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": n, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
    short, long = ours.generate_until(requests(3)), ours.generate_until(requests(10))
    assert short == hf.generate_until(requests(3))
    assert all(b.startswith(a) for a, b in zip(short, long)) and short != long


def test_is_greedy_true_for_the_models_own_continuation(runs):
    """Score each generated string after its prompt: where the text re-tokenizes to the generated tokens,
    is_greedy is True, and both backends agree on every request."""
    from lm_eval.api.instance import Instance
    ours, hf = runs["lms"]
    samples = runs["ours"]["samples"]["tl_gen"]
    reqs = [Instance("loglikelihood", {}, (s["doc"]["prompt"], s["resps"][0][0]), i)
            for i, s in enumerate(samples) if s["resps"][0][0]]
    a, b = ours.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert [g for _, g in a] == [g for _, g in b]
    assert any(g for _, g in a)
    for (x, _), (y, _) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4)


def test_registered_and_cli_writes_the_results_dict(runs, setup, tmp_path):
    """`tinyllama-ref lm-eval ... -o` writes simple_evaluate's dict; --resume reuses every logged answer."""
    from lm_eval.api.registry import get_model
    from tinyllama_ref.eval.harness import TinyLlamaLM
    assert get_model("tinyllama-ref") is TinyLlamaLM
    ckpt, tasks = setup
    out = tmp_path / "results.json"
    args = ["lm-eval", ckpt, "--tasks", "tl_mc", "--include-path", tasks, "--backend", "numpy",
            "--max-length", str(MAX_LENGTH), "-o", str(out), "-q"]

    def invoke(*extra):
        from click.testing import CliRunner
        from tinyllama_ref.cli import main
        return CliRunner().invoke(main, args + list(extra))
    r = invoke()
    assert r.exit_code == 0, r.output[-2000:]
    got = json.loads(out.read_text())
    assert got["results"]["tl_mc"]["acc,none"] == runs["hf"]["results"]["tl_mc"]["acc,none"]
    log = tmp_path / "results.json.requests.jsonl"
    n_lines = len(log.read_text().splitlines())
    assert n_lines == 1 + sum(len(r) for r in responses(runs["hf"], "tl_mc"))     # header + one per request
    again = invoke()
    assert again.exit_code == 1 and "--resume" in again.output
    resumed = invoke("--resume")
    assert resumed.exit_code == 0, resumed.output[-2000:]
    assert len(log.read_text().splitlines()) == n_lines                         # nothing recomputed
    assert json.loads(out.read_text())["results"]["tl_mc"] == got["results"]["tl_mc"]


def test_score_choices_are_the_harness_acc_and_acc_norm(runs, setup):
    """`score`'s choice and choice_norm, on the task's own prompts, are what the harness counts as acc and
    acc_norm for each document (acc_norm: log-likelihood per character of the choice)."""
    from tinyllama_ref.eval.runner import score_items
    from tinyllama_ref.eval.items import Item
    ours = runs["lms"][0]
    samples = runs["hf"]["samples"]["tl_mc"]
    items = [Item(s["doc"]["question"], s["doc"]["choices"], s["doc"]["answer"]) for s in samples]
    prompts = [f"Question: {s['doc']['question']}\nAnswer:" for s in samples]      # the YAML's doc_to_text
    records = score_items(ours.tl_model, ours.tokenizer, items, prompts=prompts)
    assert [float(r["choice"] == r["answer"]) for r in records] == [s["acc"] for s in samples]
    assert [float(r["choice_norm"] == r["answer"]) for r in records] == [s["acc_norm"] for s in samples]
    assert len({s["acc"] for s in samples} | {s["acc_norm"] for s in samples}) == 2     # both outcomes occur
