"""Shared-prefix and packed scoring give what one sequence at a time gives (transformers as the reference)."""

import numpy as np
import pytest

import tinyllama_ref
from eval_checkpoint import make_eval_checkpoint
from hf_models import hf_logits, hf_model
from tinyllama_ref.eval.batching import KV_FACTOR, pack_in_order, pack_longest_first
from tinyllama_ref.eval.prefix import Group, score_groups
from tinyllama_ref.eval.runner import score_items
from tinyllama_ref.eval.items import Item, item_prompt, split_continuation


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_eval_checkpoint(str(tmp_path_factory.mktemp("eval_prefix")))


@pytest.fixture(scope="module")
def model(ckpt):
    return tinyllama_ref.load(ckpt, backend="numpy")


@pytest.fixture(scope="module")
def reference(ckpt):
    """(loglik, is_greedy) of a continuation computed by transformers on the whole sequence."""
    hf = hf_model(ckpt)

    def score(ctx, cont):
        seq = list(ctx) + list(cont)
        logits = hf_logits(hf, seq[:-1]).astype(np.float64)[len(ctx) - 1:]          # rows predicting cont
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        return float(logp[np.arange(len(cont)), cont].sum()), bool((logits.argmax(-1) == cont).all())
    return score


# Options of different lengths (1 to many tokens).
ITEMS = [
    Item("The patient was given insulin", ["daily", "l", "and a dose of the clinical trial tablet"], 0),
    Item("Blood pressure", ["high", "after the chronic infection was treated", "x"], 0),
    Item("Which drug treats a bacterial fever?", ["antibiotic", "rest and fluids for a week", "no"], 0),
    Item("Renal", ["failure", "cardiac", "hepatic study of the acute pain", "fever"], 1, context="A passage."),
]


def one_at_a_time(model, tokenizer, reference):
    out = []
    for item in ITEMS:
        pairs = [split_continuation(tokenizer, item_prompt(item), " " + o) for o in item.options]
        out.append([reference(ctx, cont) for ctx, cont in pairs])
    return out


@pytest.mark.parametrize("batch_tokens", [1, 40, 100000])
@pytest.mark.parametrize("shared", [True, False])
def test_packed_and_shared_scoring_equal_transformers_one_at_a_time(model, reference, batch_tokens, shared):
    want = one_at_a_time(model, model.tokenizer, reference)
    got = score_items(model, model.tokenizer, ITEMS, batch_tokens=batch_tokens, shared_prefix=shared)
    assert [r["item"] for r in got] == [1, 2, 3, 4]
    for item_want, rec in zip(want, got):
        np.testing.assert_allclose(rec["loglik"], [w[0] for w in item_want], rtol=1e-5, atol=1e-5)
        assert rec["is_greedy"] == [w[1] for w in item_want]
    lengths = [[len(split_continuation(model.tokenizer, item_prompt(it), " " + o)[1]) for o in it.options]
               for it in ITEMS]
    assert [r["n_tokens"] for r in got] == lengths
    assert len(set(n for item in lengths for n in item)) > 3              # options of different lengths


# Contexts that end mid-word, each with continuations of different lengths.
MID_WORD = [("The fever resol", ["ved", "ved within three days", "v"]),
            ("Blood pre", ["sent after the chronic infection", "ssure was high", "ss"]),
            ("The patient was given insu", ["lin and a dose", "lin twice daily"])]


def test_mid_word_context_split_as_the_harness_splits(model):
    """The continuation is what follows the context's own tokens in the tokenization of the whole text
    (lm-evaluation-harness's TemplateLM._encode_pair), even where the seam merges into one token."""
    tok = model.tokenizer
    for context, options in MID_WORD:
        for option in options:
            ctx, cont = split_continuation(tok, context, option)
            assert ctx == tok.encode(context, add_bos=True)
            assert cont == tok.encode(context + option, add_bos=True)[len(ctx):] and cont
    # Trailing spaces of a context move to the continuation.
    assert split_continuation(tok, "Blood ", "pressure") == split_continuation(tok, "Blood", " pressure")


@pytest.mark.parametrize("batch_tokens", [1, 30, 100000])
def test_mid_word_groups_packed_equal_one_at_a_time(model, reference, batch_tokens):
    from tinyllama_ref.eval.runner import run_batches
    tok = model.tokenizer
    groups = []
    for context, options in MID_WORD:
        pairs = [split_continuation(tok, context, o) for o in options]
        groups.append(Group(pairs[0][0], [cont for _, cont in pairs]))
    for packer in (pack_in_order, pack_longest_first):
        got = {}
        for batch, scores in run_batches(model, groups, packer(groups, batch_tokens)):
            got.update(zip(batch, scores))
        for g, group in enumerate(groups):
            for cont, (loglik, greedy) in zip(group.continuations, got[g]):
                want = reference(group.context, cont)
                assert loglik == pytest.approx(want[0], rel=1e-5, abs=1e-5) and greedy == want[1]


def test_groups_with_greedy_continuations_and_single_token_contexts(model, reference):
    """A continuation made of the model's own greedy tokens is is_greedy; a one-token context (BOS only)
    skips the prefill; several groups with shared contexts and lone ones share one batch."""
    ctx = model.tokenizer.encode("Chronic infection", add_bos=True)
    greedy = model.generate(ctx, max_new_tokens=5, stop_ids=[])
    groups = [Group(ctx, [greedy, greedy[:2], [7, 8, 9]]), Group([1], [greedy, [5]]), Group(ctx[:3], [[11]])]
    got = score_groups(model, groups)
    for group, scores in zip(groups, got):
        for cont, (loglik, is_greedy) in zip(group.continuations, scores):
            want = reference(group.context, cont)
            assert loglik == pytest.approx(want[0], rel=1e-5, abs=1e-5)
            assert is_greedy == want[1]
    assert got[0][0][1] and got[0][1][1]          # the greedy continuation and its first two tokens


def test_copy_slot_forks_a_sequence(model):
    """Continuing a forked slot gives the logits of the same sequence run from scratch in its own cache."""
    ids = np.array(model.tokenizer.encode("The fever resolved after three days", add_bos=True))
    with model.new_cache(3, 32) as cache:
        model.forward([ids[:5]], cache, [0])
        cache.copy_slot(0, 2)
        assert cache.lengths[2] == 5
        forked = model.forward([ids[5:]], cache, [2], all_logits=True)
    whole = model.logits(ids)[5:]
    np.testing.assert_allclose(forked, whole, rtol=1e-5, atol=1e-5)


def test_packers_respect_the_limits_and_orders():
    groups = [Group([1] * n, [[2] * m for m in opts]) for n, opts in
              [(30, [3, 4]), (5, [1]), (60, [2, 2, 2]), (12, [9]), (2, [1, 1])]]
    for batches in (pack_in_order(groups, 50), pack_longest_first(groups, 50)):
        assert sorted(g for b in batches for g in b) == list(range(len(groups)))
        for b in batches:
            rows = sum(groups[g].rows() for g in b)
            positions = sum(len(groups[g].continuations) for g in b) * max(groups[g].longest() for g in b)
            assert len(b) == 1 or (rows <= 50 and positions <= KV_FACTOR * 50)
    in_order = pack_in_order(groups, 50)
    assert [g for b in in_order for g in b] == list(range(len(groups)))
    longest = pack_longest_first(groups, 50)
    firsts = [g for b in longest for g in b]
    assert firsts[0] == 2 and [groups[g].longest() for g in firsts] == sorted(
        [groups[g].longest() for g in firsts], reverse=True)
    # Hand-counted: group 0 computes 29 context rows + 3 + 4 option rows; its longest sequence is 29 + 4.
    assert (groups[0].rows(), groups[0].longest()) == (36, 33)
    assert groups[1].rows() == 4 + 1 and not groups[1].shared


@pytest.fixture(scope="module")
def gptq_model(tmp_path_factory):
    from tinyllama_ref.make.synth import synthesize
    out = str(tmp_path_factory.mktemp("eval_prefix_gptq") / "tiny")
    synthesize(out, preset="tiny", bits=4, group_size=32, act_order=True, quiet=True)
    return tinyllama_ref.load(out, backend="numba")


def test_gptq_numba_packed_and_shared_equal_one_sequence_at_a_time(gptq_model):
    """The GPTQ kernels take other paths for few rows (GEMV) and many (prefill slabs): the batch shapes
    must not change the answers beyond float32 rounding."""
    from tinyllama_ref.eval.loglik import score_item
    tok = gptq_model.tokenizer
    want = [score_item(gptq_model, tok, item) for item in ITEMS]
    for batch_tokens in (1, 100000):
        for shared in (True, False):
            got = score_items(gptq_model, tok, ITEMS, batch_tokens=batch_tokens, shared_prefix=shared)
            for w, g in zip(want, got):
                np.testing.assert_allclose(g["loglik"], w["loglik"], rtol=1e-5)
                assert g["is_greedy"] == w["is_greedy"] and g["choice"] == w["choice"]


def test_common_prefix_hand_cases():
    from tinyllama_ref.eval.prefix import common_prefix
    assert common_prefix([Group([1, 2, 3, 4], [[5]]), Group([1, 2, 3, 9, 9], [[5]])]) == 3
    assert common_prefix([Group([1, 2, 3], [[5]]), Group([1, 2, 3, 4, 5], [[5]])]) == 2   # keeps a last token
    assert common_prefix([Group([1, 2], [[5]])]) == 0                                     # one group: none
    assert common_prefix([Group([7, 2], [[5]]), Group([1, 2], [[5]])]) == 0


def test_common_prefix_of_a_batch_runs_once_and_changes_nothing(model, reference, monkeypatch):
    """Few-shot prompts with the same demonstrations: the shared start runs once (pass 0), then each group
    continues from a fork of it; one group's context is exactly the common prefix plus one token, another
    has a single continuation. Scores equal transformers on the whole sequences."""
    from tinyllama_ref.eval.prefix import MIN_COMMON
    tok = model.tokenizer
    demos = tok.encode("Question: What treats a bacterial fever?\nAnswer: antibiotics\n\n" * 3, add_bos=True)
    assert len(demos) > MIN_COMMON
    groups = [Group(demos + tok.encode("Question: Is aspirin an NSAID?\nAnswer:", add_bos=False),
                    [tok.encode(" yes", add_bos=False), tok.encode(" no, it is not", add_bos=False)]),
              Group(demos + [42], [[7, 8], [9]]),
              Group(demos + tok.encode("Question: Renal?", add_bos=False), [[11, 12, 13]])]
    calls = []
    forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda chunks, *a, **k: calls.append(
        [len(c) for c in chunks]) or forward(chunks, *a, **k))
    got = score_groups(model, groups)
    assert calls[0] == [len(demos)] and len(calls) == 3                 # pass 0: the demonstrations, once
    for group, scores in zip(groups, got):
        for cont, (loglik, greedy) in zip(group.continuations, scores):
            want = reference(group.context, cont)
            assert loglik == pytest.approx(want[0], rel=1e-5, abs=1e-5) and greedy == want[1]
