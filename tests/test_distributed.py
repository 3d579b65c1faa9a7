"""Data-parallel runs on a local Ray cluster: the same records as one process, a killed worker survived.

One Ray instance (2 CPUs, loopback only) serves every test of the distributed files (distributed_helpers's
session fixture, shut down at the end). The reference is always the single-process
code path on the same checkpoint: eval.runner's scoring and perplexity, Model.generate.
"""

import threading

import numpy as np
import pytest

import distributed_helpers
from distributed_helpers import blas_threads, ray_cluster  # noqa: F401 (a fixture)
import tinyllama_ref
from tinyllama_ref.distributed.shard import chunk_ranges, contiguous_split
from tinyllama_ref.errors import CheckpointError, GenerationError

ray = pytest.importorskip("ray")

BATCH_TOKENS = 96          # small, so the test items make many batches (and chunks) for two workers


@pytest.fixture(scope="session")
def gptq_ckpt(tmp_path_factory):
    from tinyllama_ref.make.synth import synthesize
    out = str(tmp_path_factory.mktemp("dist") / "gptq")
    synthesize(out, preset="tiny", bits=4, group_size=32, act_order=True, quiet=True)
    return out


@pytest.fixture(scope="module")
def local(gptq_ckpt):
    return tinyllama_ref.load(gptq_ckpt, backend="numpy")


@pytest.fixture(scope="module")
def pool(ray_cluster, gptq_ckpt):
    from tinyllama_ref.distributed.runner import DataParallel
    with DataParallel(gptq_ckpt, workers=2, backend="numpy", address="auto", threads=blas_threads()) as p:
        yield p


@pytest.fixture(scope="module")
def items():
    from tinyllama_ref.eval.items import parse_item
    from tinyllama_ref.make.tokenizer_files import generate_text
    lines = generate_text(80, 80, seed=5)
    out = []
    for i in range(20):
        words = lines[i].split()
        opts = [" ".join(lines[20 + 2 * i + k].split()[:2 + (i + k) % 5]) or "none" for k in range(3)]
        out.append(parse_item({"question": " ".join(words[:4 + i % 7]), "options": opts, "answer": i % 3},
                              f"item {i + 1}"))
    return out


@pytest.fixture(scope="module")
def text_ids(local):
    from tinyllama_ref.make.tokenizer_files import generate_text
    return local.tokenizer.encode(" ".join(generate_text(30, 60, seed=9)), add_bos=True)


# -- sharding ------------------------------------------------------------------------------------------------
def test_contiguous_split_hand_cases():
    assert contiguous_split([1] * 10, 3) == [(0, 3), (3, 7), (7, 10)]      # boundaries at 3.3 and 6.7
    assert contiguous_split([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]     # 5 | 5
    assert contiguous_split([1, 1, 1, 100], 2) == [(0, 3), (3, 4)]
    assert contiguous_split([1, 2, 3], 5) == [(0, 1), (1, 2), (2, 3)]      # never an empty piece
    assert contiguous_split([], 3) == []


@pytest.mark.parametrize("seed", range(5))
def test_contiguous_split_covers_in_order_and_balances(seed):
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 50, size=int(rng.integers(5, 60)))
    k = int(rng.integers(1, 9))
    pieces = contiguous_split(costs, k)
    assert [a for a, _ in pieces][1:] == [b for _, b in pieces][:-1] and pieces[0][0] == 0
    assert pieces[-1][1] == len(costs) and all(b > a for a, b in pieces) and len(pieces) == min(k, len(costs))
    share = costs.sum() / len(pieces)
    # Every cut sits next to its ideal point, so a piece misses its share by less than two items' costs.
    assert all(abs(costs[a:b].sum() - share) < 2 * costs.max() for a, b in pieces)


def test_chunks_start_only_at_boundaries():
    chunks = chunk_ranges([3, 1, 1, 1, 1, 4, 2], 2, boundaries=[0, 2, 5, 6])
    assert all(a in (0, 2, 5, 6) for a, _ in chunks)
    assert chunks[0][0] == 0 and chunks[-1][1] == 7 and [a for a, _ in chunks][1:] == [b for _, b in chunks][:-1]


# -- data parallel -------------------------------------------------------------------------------------------
def reference_records(local, items, skip=0):
    from tinyllama_ref.eval.runner import iter_score
    return [r for rs in iter_score(local, local.tokenizer, items, BATCH_TOKENS, skip=skip) for r in rs]


def test_score_on_two_workers_equals_one_process(pool, local, items):
    from tinyllama_ref.distributed.tasks import iter_score
    from tinyllama_ref.progress import Progress
    expected = reference_records(local, items)
    bar = Progress("scoring", None, enabled=False)
    got = list(iter_score(pool, local.cfg, local.tokenizer, items, BATCH_TOKENS, progress=bar))
    assert got == expected                                # every float to the last bit, in input order
    assert [r["item"] for r in got] == list(range(1, len(items) + 1))
    assert len({h for h in pool.hosts}) == 2 and bar.done == bar.total > 0    # two processes, one bar


def test_score_resumed_at_a_batch_boundary(pool, local, items):
    from tinyllama_ref.distributed.tasks import iter_score
    from tinyllama_ref.eval.runner import batch_starts
    skip = batch_starts(local, local.tokenizer, items, BATCH_TOKENS)[3]
    got = list(iter_score(pool, local.cfg, local.tokenizer, items, BATCH_TOKENS, skip=skip))
    assert got == reference_records(local, items, skip=skip) and got[0]["item"] == skip + 1


def test_perplexity_on_two_workers_equals_one_process(pool, local, text_ids):
    from tinyllama_ref.distributed.tasks import iter_perplexity_records
    from tinyllama_ref.eval.runner import iter_perplexity, perplexity_from_records
    from tinyllama_ref.eval.loglik import perplexity
    expected = [r for rs in iter_perplexity(local, text_ids, 64, 40, BATCH_TOKENS) for r in rs]
    got = list(iter_perplexity_records(pool, local.cfg, text_ids, 64, 40, BATCH_TOKENS))
    assert len(expected) > 8 and got == expected
    summary = perplexity_from_records(got, len(text_ids))
    # and the one-window-per-pass reference of eval/loglik.py agrees (to round-off: other row groupings)
    assert summary["perplexity"] == pytest.approx(perplexity(local, text_ids, 64, 40)["perplexity"], rel=1e-5)


def test_generate_on_two_workers_equals_one_process(pool, local, text_ids):
    from tinyllama_ref.distributed.tasks import generate
    prompts = [text_ids[i:i + 3 + i % 4] for i in range(0, 40, 5)]
    expected = local.generate(prompts, max_new_tokens=5)
    assert generate(pool, prompts, max_new_tokens=5) == expected


def test_a_worker_killed_inside_a_chunk_is_replaced_and_nothing_is_lost(pool, local, items, tmp_path):
    import functools
    from tinyllama_ref.distributed.shard import chunk_ranges
    from tinyllama_ref.distributed.tasks import item_prompt, score_chunk
    from tinyllama_ref.eval.runner import batch_starts
    expected = reference_records(local, items)
    starts = batch_starts(local, local.tokenizer, items, BATCH_TOKENS)
    pairs = [(it, item_prompt(it)) for it in items]
    costs = [len(p) for _, p in pairs]
    gated = chunk_ranges(costs, len(pool.actors), starts)[1][0]        # the second chunk: one worker holds it
    work = distributed_helpers.GatedWork(functools.partial(score_chunk, batch_tokens=BATCH_TOKENS,
                                                           shared_prefix=True, first_number=1), str(tmp_path), gated)
    replaced_before = pool.replaced
    out = {}
    t = threading.Thread(target=lambda: out.update(
        records=[r for _, r in pool.map(work, pairs, costs=costs, boundaries=starts)]))
    t.start()
    started = tmp_path / "started"
    for _ in range(6000):
        if started.exists() or not t.is_alive():
            break
        threading.Event().wait(0.02)
    assert started.exists(), "the gated chunk never started"
    victim = [a for a in pool.actors if a._actor_id.hex() == started.read_text()]
    assert len(victim) == 1
    ray.kill(victim[0])                                  # mid-chunk for certain: it is waiting at the gate
    (tmp_path / "open").write_text("")
    t.join(300)
    assert not t.is_alive() and pool.replaced == replaced_before + 1 and victim[0] not in pool.actors
    assert out["records"] == expected                    # nothing lost, nothing twice, the same bits


def test_an_error_in_the_work_is_raised_not_retried(pool, local):
    from tinyllama_ref.distributed.tasks import generate
    too_long = [1] * (local.cfg.max_seq_len + 1)
    replaced_before = pool.replaced
    with pytest.raises(GenerationError, match="context"):
        generate(pool, [[1, 2, 3], too_long], max_new_tokens=2)
    assert pool.replaced == replaced_before


def test_a_checkpoint_no_worker_can_read_is_one_error(ray_cluster, tmp_path):
    from tinyllama_ref.distributed.runner import DataParallel
    with pytest.raises(CheckpointError, match="worker on"):
        # cpus_per_worker=0: the pool above holds both CPUs of the test cluster
        DataParallel(str(tmp_path / "missing"), workers=1, backend="numpy", cpus_per_worker=0)


def test_more_workers_than_the_cluster_has_cores_is_refused_up_front(ray_cluster, gptq_ckpt):
    from tinyllama_ref.distributed.cluster import DistributedError
    from tinyllama_ref.distributed.runner import DataParallel
    with pytest.raises(DistributedError, match="3 workers x 1 CPUs do not fit the Ray cluster's 2 CPUs"):
        DataParallel(gptq_ckpt, workers=3, backend="numpy")
