"""Few-shot prompts for `score`: the format written out by hand, the draws' properties, --show-prompt, and
few-shot scoring against one-option-at-a-time transformers scoring."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from eval_checkpoint import make_eval_checkpoint
from hf_models import hf_logits, hf_model
from tinyllama_ref.cli import main
from tinyllama_ref.eval.fewshot import fewshot_prompts
from tinyllama_ref.eval.items import Item, parse_item

TRAIN = [Item("What treats a bacterial fever?", ["rest", "antibiotics"], 1),
         Item("Cough is a symptom of?", ["flu", "a broken arm"], 0, context="A short passage."),
         Item("Which organ filters blood?", ["kidney", "skin", "hair"], 0),
         Item("Insulin lowers?", ["blood sugar", "heart rate"], 0)]


def test_one_demonstration_written_out_by_hand():
    item = Item("Is aspirin an NSAID?", ["yes", "no"], 0)
    [prompt] = fewshot_prompts([item], TRAIN[:1], 1, seed=3)
    assert prompt == ("Question: What treats a bacterial fever?\nAnswer: antibiotics\n\n"
                      "Question: Is aspirin an NSAID?\nAnswer:")
    [with_passage] = fewshot_prompts([item], TRAIN[1:2], 1)
    assert with_passage == ("A short passage.\nQuestion: Cough is a symptom of?\nAnswer: flu\n\n"
                            "Question: Is aspirin an NSAID?\nAnswer:")


def test_draws_are_seeded_distinct_and_never_the_item_itself():
    items = TRAIN + [Item(f"Question number {i}?", ["a", "b"], 0) for i in range(6)]
    a = fewshot_prompts(items, TRAIN, 3, seed=7)
    assert a == fewshot_prompts(items, TRAIN, 3, seed=7)
    assert a != fewshot_prompts(items, TRAIN, 3, seed=8)
    for item, prompt in zip(items, a):
        blocks = prompt.split("\n\n")
        assert len(blocks) == 4 and blocks[-1].endswith(f"Question: {item.question}\nAnswer:")
        assert prompt.count(item.question) == 1                      # not among its own demonstrations
        for block in blocks[:-1]:
            demo = next(t for t in TRAIN if f"Question: {t.question}\n" in block)
            assert block.endswith(f"Answer: {demo.options[demo.answer]}")
    with pytest.raises(Exception, match="at least 4"):
        fewshot_prompts(items, TRAIN, 4)                            # TRAIN[0] has only 3 others


def test_show_prompt_prints_the_format_without_a_model(tmp_path):
    items, train = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    items.write_text(json.dumps({"question": "Is aspirin an NSAID?", "options": ["yes", "no"], "answer": 0}) + "\n")
    train.write_text(json.dumps({"question": "What treats a bacterial fever?", "options": ["rest", "antibiotics"],
                                 "answer": "B"}) + "\n")
    r = CliRunner().invoke(main, ["score", str(tmp_path / "no-checkpoint"), str(items), "--num-fewshot", "1",
                                  "--fewshot-file", str(train), "--show-prompt"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Question: What treats a bacterial fever?\nAnswer: antibiotics\n\n"
                               "Question: Is aspirin an NSAID?\nAnswer:\n")
    assert '* " yes"' in r.output and '  " no"' in r.output


def test_fewshot_scores_equal_transformers_one_option_at_a_time(tmp_path_factory, tmp_path):
    ckpt = make_eval_checkpoint(str(tmp_path_factory.mktemp("eval_fewshot")))
    test_items = [{"question": "Is aspirin an NSAID?", "options": ["yes", "no", "only in the renal study"],
                   "answer": 0},
                  {"question": "Which dose is daily?", "options": ["10 mg", "a tablet after the meal"], "answer": 1}]
    items, train = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    items.write_text("".join(json.dumps(x) + "\n" for x in test_items))
    train.write_text("".join(json.dumps({"question": t.question, "options": t.options, "answer": t.answer,
                                         "context": t.context}) + "\n" for t in TRAIN))
    r = CliRunner().invoke(main, ["score", ckpt, str(items), "--num-fewshot", "2", "--fewshot-file", str(train),
                                  "--seed", "4", "--backend", "numpy", "--json", "-q"])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()[:-1]]
    import tinyllama_ref
    tok = tinyllama_ref.load(ckpt, backend="numpy").tokenizer
    hf = hf_model(ckpt)
    parsed = [parse_item(x, "test") for x in test_items]
    for item, prompt, rec in zip(parsed, fewshot_prompts(parsed, TRAIN, 2, seed=4), records):
        ctx = tok.encode(prompt, add_bos=True)
        for option, got in zip(item.options, rec["loglik"]):
            whole = tok.encode(prompt + " " + option, add_bos=True)
            logits = hf_logits(hf, whole[:-1]).astype(np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            want = sum(logp[t - 1, whole[t]] for t in range(len(ctx), len(whole)))
            assert got == pytest.approx(want, rel=1e-5)


def test_same_demonstrations_for_every_item_skip_the_test_questions():
    items = [TRAIN[0], Item("Is aspirin an NSAID?", ["yes", "no"], 0)]
    prompts = fewshot_prompts(items, TRAIN[:3], 2, seed=1, same=True)      # TRAIN[0] is a test question
    head = "A short passage.\nQuestion: Cough is a symptom of?\nAnswer: flu\n\n" \
           "Question: Which organ filters blood?\nAnswer: kidney\n\n"
    other_order = "Question: Which organ filters blood?\nAnswer: kidney\n\n" \
                  "A short passage.\nQuestion: Cough is a symptom of?\nAnswer: flu\n\n"
    assert prompts[0][:len(head)] in (head, other_order)
    assert [p[:len(head)] for p in prompts] == [prompts[0][:len(head)]] * 2
    assert prompts[1].endswith("\n\nQuestion: Is aspirin an NSAID?\nAnswer:")
    assert prompts[0].endswith("\n\nQuestion: What treats a bacterial fever?\nAnswer:")
