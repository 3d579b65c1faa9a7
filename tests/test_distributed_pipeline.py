"""A model split into 2 pipeline stages on a local Ray cluster against the same model in one process.

Tiny GPTQ (4-bit, act-order) and dense (fp16) checkpoints, numba backend; the reference is
tinyllama_ref.load on the same files in this process; each stage actor runs as many BLAS threads.
"""

import numpy as np
import pytest

from distributed_helpers import blas_threads, ray_cluster  # noqa: F401 (a fixture)
import tinyllama_ref
from tinyllama_ref.errors import MemoryBudgetError

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", params=["gptq", "dense"])
def pair(request, ray_cluster, tmp_path_factory):
    """(pipeline TextModel with 2 stages, single-process TextModel) on one checkpoint."""
    from tinyllama_ref.distributed.pipeline import PipelineModel
    from tinyllama_ref.make.synth import synthesize
    out = str(tmp_path_factory.mktemp("pipe") / request.param)
    if request.param == "gptq":
        synthesize(out, preset="tiny", bits=4, group_size=32, act_order=True, quiet=True)
    else:
        synthesize(out, preset="tiny", dense_dtype="fp16", quiet=True)
    pipe = PipelineModel(out, stages=2, address="auto", threads=blas_threads())
    yield tinyllama_ref.TextModel(pipe), tinyllama_ref.load(out)
    pipe.close()


def prompt(model, n=40, seed=0):
    return [1] + list(np.random.default_rng(seed).integers(3, model.cfg.vocab_size, size=n - 1))


def test_stages_hold_contiguous_halves(pair):
    pipe, _ = pair
    assert pipe.layers.ranges == [(0, 2), (2, 4)]       # the tiny preset's 4 layers, equal bytes each
    assert pipe.layers.describe().startswith("pipeline of 2 stages: layers 0-1 on ")


def test_logits_are_bit_identical(pair):
    pipe, local = pair
    ids = prompt(local)
    expected = local.logits(ids)                                         # [40, V]
    got = pipe.logits(ids)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_greedy_generation_is_the_same(pair):
    pipe, local = pair
    ids = prompt(local, 12, seed=1)
    expected = local.generate(ids, max_new_tokens=10, stop_ids=[])
    text = local.generate_text("The patient presented with", max_new_tokens=10, temperature=0.0).text
    assert pipe.generate(ids, max_new_tokens=10, stop_ids=[]) == expected
    assert pipe.generate_text("The patient presented with", max_new_tokens=10, temperature=0.0).text == text


def test_micro_batches_equal_one_process_running_the_same_groups(pair):
    pipe, local = pair
    seqs = [np.array(prompt(local, n, seed=n)) for n in (7, 5, 9, 3)]
    with local.new_cache(4, 16) as cache:
        # micro_batches=2 cuts the 24 rows into sequences (0, 1) and (2, 3)
        expected = np.concatenate([local.forward(seqs[:2], cache, [0, 1], all_logits=True),
                                   local.forward(seqs[2:], cache, [2, 3], all_logits=True)])
        # a decode step, 2 slots: micro-batches of one sequence each, run one after the other
        step = np.concatenate([local.forward([np.array([5])], cache, [1]),
                               local.forward([np.array([6])], cache, [3])])
    with pipe.new_cache(4, 16) as cache:
        assert pipe.micro_batches == 2
        got = pipe.forward(seqs, cache, [0, 1, 2, 3], all_logits=True)          # [24, V]
        got_step = pipe.forward([np.array([5]), np.array([6])], cache, [1, 3])  # [2, V]
        assert list(cache.lengths) == [7, 6, 9, 4]
    assert np.array_equal(got, expected) and np.array_equal(got_step, step)


def test_shared_prefix_scoring_runs_on_it_unchanged(pair):
    from tinyllama_ref.eval.runner import score_items
    from tinyllama_ref.eval.items import parse_item
    pipe, local = pair
    items = [parse_item({"question": f"Which sign goes with case {i}?", "options": ["fever", "a dry cough",
                         "rash on the arms"], "answer": i % 3}, f"item {i}") for i in range(4)]
    expected = score_items(local, local.tokenizer, items, batch_tokens=128)
    pipe.model.micro_batches = 1                   # one group per pass, as the single process runs it
    try:
        got = score_items(pipe, pipe.tokenizer, items, batch_tokens=128)      # forks slots: copy_slot
    finally:
        pipe.model.micro_batches = 2
    assert got == expected


def test_a_stage_over_its_budget_is_one_error(pair):
    from tinyllama_ref.distributed.pipeline import PipelineModel
    pipe, _ = pair
    with pytest.raises(MemoryBudgetError, match=r"layers [02]-[13] of 4 .*--stages"):
        PipelineModel(pipe.path, stages=2, max_memory="20MB", cpus_per_stage=0)   # the pair holds the CPUs


def test_the_servers_scheduler_runs_on_it_unchanged(pair):
    """serve/scheduler.py's continuous batching (chunked prefill, slots, one pass per step) on the pipeline:
    every greedy sequence ends with the tokens the single-process model generates for it alone."""
    from tinyllama_ref.sampling import SamplingParams
    from tinyllama_ref.serve.jobs import Finished, Job
    from tinyllama_ref.serve.scheduler import Scheduler
    pipe, local = pair
    prompts = [prompt(local, n, seed=10 + n) for n in (5, 19, 9)]
    events = [[] for _ in prompts]
    sch = Scheduler(pipe, max_batch=2, max_queue=4, prefill_chunk=8)
    sch.submit([Job(prompt_ids=p, max_new_tokens=6, params=SamplingParams(temperature=0.0), stop_ids=frozenset(),
                    on_event=ev.append) for p, ev in zip(prompts, events)])
    while any(not ev or not isinstance(ev[-1], Finished) for ev in events):
        with sch.cond:
            sch._admit()
        sch.step()
    sch.cache.close()
    for p, ev in zip(prompts, events):
        assert ev[-1].token_ids == local.generate(p, max_new_tokens=6, stop_ids=[])
