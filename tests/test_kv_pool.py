"""The server's KV pool (kvcache.PagedKVCache, kvcache.plan_pool): sized from the budget and the model, read
through block tables with the same numbers as a contiguous cache, and handed out as sequences grow."""

import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import tinyllama_ref
from tinyllama_ref import memory
from tinyllama_ref.config import preset
from tinyllama_ref.errors import MemoryBudgetError
from tinyllama_ref.kvcache import BLOCK_SIZE, PagedKVCache, PoolPlan, bytes_per_position, plan_pool
from tinyllama_ref.model import Model
from tinyllama_ref.sampling import SamplingParams
from tinyllama_ref.serve.jobs import Finished, Job, ServeError
from tinyllama_ref.streaming import JIT_RESERVE, SAFETY, SAFETY_FRACTION


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tinyllama_ref.make.synth import synthesize
    path = str(tmp_path_factory.mktemp("kvpool") / "tiny-gptq")
    synthesize(path, preset="tiny", bits=4, group_size=32, act_order=True, quiet=True)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return tinyllama_ref.load(ckpt, backend="numpy")


def pool(cfg, n_blocks, kv_dtype="f32", n_slots=2, prefix_cache=True):
    plan = PoolPlan(n_blocks, BLOCK_SIZE, kv_dtype, n_blocks * BLOCK_SIZE * bytes_per_position(cfg, kv_dtype),
                    cfg.max_seq_len)
    return PagedKVCache(cfg, plan, n_slots, prefix_cache=prefix_cache)


# -- numerics -------------------------------------------------------------------------------------------------
def test_paged_logits_equal_the_contiguous_cache_bit_for_bit(model):
    """A sequence read out of the pool, its blocks consecutive or scattered (another sequence growing beside
    it takes every other block), gets the logits a contiguous KVCache slot gives, chunk by chunk; float16
    storage moves them only slightly."""
    ids = np.random.default_rng(0).integers(3, model.cfg.vocab_size, 70)
    chunks = (5, 20, 1, 30, 14)

    def run(cache, other=None):
        out, pos = [], 0
        for n in chunks:
            if other is not None:                     # the other sequence grows by a block between passes
                cache.grow(other, BLOCK_SIZE)
                cache.lengths[other] += BLOCK_SIZE
                cache.recorded[other] += BLOCK_SIZE
                cache.grow(0, n)
            out.append(model.forward([ids[pos:pos + n]], cache, [0], all_logits=True))   # [n, V]
            if other is not None:
                cache.filled(0, ids[pos:pos + n])
            pos += n
        return np.concatenate(out)                                                         # [70, V]

    with model.new_cache(1, 100) as contiguous:
        reference = run(contiguous)
    for placed in (True, False):        # each sequence on its own run of blocks (read as a view), or not
        paged = pool(model.cfg, 40)
        if not placed:
            paged._place = lambda need: range(0)
        paged.open(0, 100)
        paged.open(1, 200)
        assert np.array_equal(run(paged, other=1), reference)
        table = paged.tables[0]
        assert (table == list(range(table[0], table[0] + len(table)))) == placed, table
    half = pool(model.cfg, 40, "f16")
    half.open(0, 100)
    half.open(1, 200)
    assert np.abs(run(half, other=1) - reference).max() < 1e-2 * np.abs(reference).max()


# -- sizing -----------------------------------------------------------------------------------------------------
def gptq_layer_bytes(cfg, bits=4, group=128):
    """A GPTQ layer's file bytes: packed codes, fp16 scales, packed zeros and g_idx per linear, two norms."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    linears = [(cfg.dim, q), (cfg.dim, kv), (cfg.dim, kv), (q, cfg.dim),
               (cfg.dim, cfg.hidden_dim), (cfg.dim, cfg.hidden_dim), (cfg.hidden_dim, cfg.dim)]
    total = 2 * cfg.dim * 2
    for n_in, n_out in linears:
        groups = math.ceil(n_in / group)
        total += n_in * n_out * bits // 8 + groups * n_out * 2 + groups * n_out * bits // 8 + n_in * 4
    return total


def serve_plan(cfg, budget, max_batch=16, prefill_chunk=128, kv_dtype="f32", baseline=10**9):
    """What Scheduler.__init__ hands plan_pool, worked out from the config alone: the fixed costs
    (streaming.LayerSource._fixed: baseline, float32 head at worst, JIT reserve, safety, the activations of the
    largest pass and one gathered sequence, the RoPE tables), all layers, and the two-layer streaming window."""
    ctx = cfg.max_seq_len
    activations = Model.workspace_bytes(SimpleNamespace(cfg=cfg), prefill_chunk + max_batch, ctx, True)
    gathered = 2 * ctx * cfg.n_kv_heads * cfg.head_dim * 4
    rope = 2 * ctx * cfg.head_dim * 4
    fixed = (baseline + cfg.vocab_size * cfg.dim * 4 + JIT_RESERVE + SAFETY + int(SAFETY_FRACTION * budget)
             + activations + gathered + rope)
    layer = gptq_layer_bytes(cfg)
    window = 2 * (layer + 4096 * 7 * 4) + 2**20
    free = budget - fixed
    plan = plan_pool(cfg, free, cfg.n_layers * layer, window, max_batch, ctx, kv_dtype)
    return plan, free, cfg.n_layers * layer, window


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-70b"])
def test_default_pool_fits_7b_and_70b_on_a_24_gb_machine(name, monkeypatch):
    """A 24 GB machine reports about 24.7 GB available: the default budget is the issue's 21.0 GB."""
    monkeypatch.setattr(memory, "available_memory", lambda: int(24.7e9))
    budget = memory.default_budget()
    assert round(budget / 1e9, 1) == 21.0
    cfg = preset(name)
    one = bytes_per_position(cfg) * cfg.max_seq_len               # one sequence of the full 4,096 positions
    assert one == {"llama2-7b": 2 * 32 * 32 * 128 * 4, "llama2-70b": 2 * 80 * 8 * 128 * 4}[name] * 4096
    for kv_dtype in ("f32", "f16"):
        plan, free, weights, window = serve_plan(cfg, budget, kv_dtype=kv_dtype)
        print(name, kv_dtype, plan.describe())
        assert plan.sequences(cfg.max_seq_len) >= 1 and plan.sequences(512) >= 8
        assert plan.nbytes <= free - window                       # the pool fits beside the streaming window
        assert plan.nbytes == plan.positions * bytes_per_position(cfg, kv_dtype)
        if name == "llama2-7b":
            assert plan.nbytes + weights <= free                  # and the 7B stays wholly resident
            assert plan.sequences(cfg.max_seq_len) >= 3
        else:                                                     # the 70B streams: a quarter of the room
            assert plan.nbytes <= (free - window) // 4 + one
        assert plan.nbytes < 16 * one / 2               # the old reservation was 16 x 4096 float32 positions


def test_refuses_when_one_sequence_cannot_fit():
    cfg = preset("llama2-70b")
    one = bytes_per_position(cfg) * cfg.max_seq_len               # 2.7 GB of float32 K/V
    with pytest.raises(MemoryBudgetError, match="--max-context 4096.*Lower --max-context, use --kv-dtype f16, "
                                                "or raise --max-memory"):
        plan_pool(cfg, free=one, weight_bytes=40 * 10**9, window_bytes=10**9, max_batch=16, max_context=4096)
    # half the positions, or float16, fit the same room
    assert plan_pool(cfg, one, 40 * 10**9, 10**9, 16, 2048).sequences(2048) == 1
    assert plan_pool(cfg, one, 40 * 10**9, 10**9, 16, 4096, "f16").sequences(4096) == 1
    with pytest.raises(MemoryBudgetError, match="--kv-pool 1.0 GB holds 1,?5\\d\\d positions.*raise --kv-pool or "
                                                "lower --max-context"):
        plan_pool(cfg, 10**12, 0, 0, 16, 4096, pool_bytes=10**9)


def test_serve_refuses_cleanly_when_the_pool_holds_less_than_one_sequence(ckpt):
    """The real command: exit status 1 and one line naming the flag, no traceback."""
    r = subprocess.run([sys.executable, "-m", "tinyllama_ref", "serve", ckpt, "--port", "0", "--backend", "numpy",
                        "--kv-pool", "100kB"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "--kv-pool 100.0 kB holds" in r.stderr and "raise --kv-pool or lower --max-context" in r.stderr
    assert "Traceback" not in r.stderr


# -- the scheduler: admission by blocks -------------------------------------------------------------------------
def test_admission_waits_for_blocks_and_the_pool_is_in_the_budget(model):
    """A pool of 8 blocks and 4 batch places: sequences that may reach 40 positions (3 blocks each) are
    admitted two at a time; all finish with the greedy tokens of generate(), and every block comes back."""
    from tinyllama_ref.serve.scheduler import Scheduler
    cfg = model.cfg
    per_block = BLOCK_SIZE * bytes_per_position(cfg)
    sch = Scheduler(model, max_batch=4, max_queue=8, max_context=64, prefill_chunk=16, kv_pool=8 * per_block,
                    log=lambda line: None, prefix_cache=False)
    assert sch.cache.n_blocks == 8 and model.layers.reserved["KV cache pool"] == sch.cache.nbytes
    tok = model.tokenizer
    texts = ["The patient presented with fever", "Cough and", "Antibiotics were", "Aspirin is"]
    events = [[] for _ in texts]
    jobs = [Job(prompt_ids=tok.encode(t, add_bos=True), max_new_tokens=40 - len(tok.encode(t, add_bos=True)),
                params=SamplingParams(temperature=0.0), stop_ids=frozenset(), on_event=events[i].append)
            for i, t in enumerate(texts)]
    sch.submit(jobs)
    with pytest.raises(ServeError, match="overloaded"):         # the queue holds 8: 4 waiting + 5 > 8
        sch.submit(jobs + [jobs[0]])
    most = 0
    while sch.waiting or sch.active:
        with sch.cond:
            sch._admit()
        most = max(most, len(sch.active))
        assert sch.cache.available() >= 0
        sch.step()
    assert most == 2                                            # 3 blocks each: 2 fit in 8, 3 do not
    for job, ev in zip(jobs, events):
        assert isinstance(ev[-1], Finished)
        assert ev[-1].token_ids == model.generate(job.prompt_ids, max_new_tokens=job.max_new_tokens, stop_ids=[])
    assert sch.cache.usage() == (0, 0, 8)                        # no prefix cache: every block is free again
    sch.cache.close()
    sch.rope.close()
    assert "KV cache pool" not in model.layers.reserved


# -- the index: sharing, copying, eviction ------------------------------------------------------------------------
def fill(cache, slot, tokens):
    """Write a sequence's tokens as a pass would (the K/V rows themselves are not looked at here)."""
    cache.grow(slot, len(tokens))
    cache.lengths[slot] += len(tokens)
    cache.filled(slot, tokens)


def test_shared_blocks_are_counted_and_evicted_least_recently_used_deepest_first():
    cfg = preset("tiny")
    c = pool(cfg, 6, n_slots=3)
    B = BLOCK_SIZE
    prefix = list(range(100, 100 + 2 * B))                      # two full blocks
    a, b = prefix + [1, 2, 3, 4, 5], prefix + [7, 8, 9, 10, 11, 12]
    c.open(0, 3 * B)
    fill(c, 0, a)
    c.open(1, 3 * B)
    assert c.match(1, b, len(b) - 1) == 2 * B                   # both full blocks shared ...
    assert c.tables[1][:2] == c.tables[0][:2] and [c.refs[x] for x in c.tables[0]] == [2, 2, 1]
    fill(c, 1, b[2 * B:])
    c.close(0)
    c.close(1)
    assert c.usage() == (0, 4, 2)                               # ... two shared + two tails cached
    # a prompt with a's first 2B + 4 tokens copies 4 rows of a's tail into a block of its own
    c.open(2, 3 * B)
    assert c.match(2, a[:2 * B + 4] + [99], 2 * B + 4) == 2 * B + 4
    tail_a = c.tables[2][2]
    c.close(2)
    assert list(c.cached) == [3, 2, 4, 1, 0] and c.free == {5}    # deepest first: the prefix is most recent
    # unrelated sequences need blocks: the free one, then the least recently used cached ones
    c.open(0, 2 * B)
    fill(c, 0, list(range(500, 500 + 2 * B)))
    assert 3 not in c.cached and c.usage() == (2, 4, 0)        # b's tail went first
    c.open(1, B)
    fill(c, 1, list(range(700, 700 + B)))
    assert list(c.cached) == [4, 1, 0]                         # then a's; the shared prefix stays
    c.close(0)
    c.close(1)
    c.open(2, 3 * B)
    assert c.match(2, b, len(b) - 1) == 2 * B
    assert c.tables[2] == [0, 1]


def test_notes_travel_with_their_rows_and_back_off_gives_back_one_position():
    """Prompt-logprob requests: only rows with notes are taken (need_notes), copied rows bring their notes,
    and back_off drops the last position, copying a block others share instead of shortening it."""
    cfg = preset("tiny")
    c = pool(cfg, 10, n_slots=4)
    B = BLOCK_SIZE
    c.k[0][:] = np.random.default_rng(0).standard_normal(c.k[0].shape)     # rows to recognise copies by
    toks = list(range(100, 100 + 2 * B + 6))
    c.open(0, 3 * B)
    c.grow(0, len(toks))
    c.lengths[0] = len(toks)
    c.filled(0, toks, notes=[("note", p) for p in range(len(toks))])
    c.open(3, 3 * B)                                          # the same tokens without notes
    fill(c, 3, toks[:B])
    assert c.full[c.chain[0][0]] == c.tables[0][0]            # the noted block stays the indexed one
    c.open(1, 3 * B)
    assert c.match(1, toks, len(toks) - 1, need_notes=True) == 2 * B + 5      # 2 shared, 5 rows copied
    assert c.notes_of(1, 0, 2 * B + 5) == [("note", p) for p in range(2 * B + 5)]
    own = c.tables[1][2]
    c.back_off(1)                                             # our own block: just shorter
    assert c.lengths[1] == 2 * B + 4 and c.tokens[own] == toks[2 * B:2 * B + 4] and c.tables[1][2] == own
    c.open(2, 3 * B)
    assert c.match(2, toks[:2 * B] + [999], 2 * B, need_notes=True) == 2 * B
    shared = c.tables[2][1]
    assert c.refs[shared] == 3
    c.back_off(2)                                             # shared: replaced by a copy of its first B-1 rows
    copy = c.tables[2][1]
    assert copy != shared and c.refs[shared] == 2 and c.lengths[2] == 2 * B - 1
    assert c.tokens[copy] == toks[B:2 * B - 1] and len(c.chain[2]) == 1
    assert np.array_equal(c.k[0][copy, :B - 1], c.k[0][shared, :B - 1])
    for slot in range(4):
        c.close(slot)
    plain = list(range(500, 500 + B + 6))                     # a prompt scored without logprobs
    c.open(0, 2 * B)
    fill(c, 0, plain)
    c.close(0)
    c.open(1, 2 * B)
    assert c.match(1, plain, len(plain) - 1, need_notes=True) == 0     # its rows carry no logprobs
    assert c.match(1, plain, len(plain) - 1) == B + 5


def test_random_sequences_keep_the_pool_consistent():
    """Sequences open, take prefixes (with and without notes), back off, grow and close at random in a small
    pool. After every step: reference counts match the block tables, every block is held, cached or free,
    promises can be kept, the index keys match block contents, and every sequence reads, at each of its
    positions, the row written for its own tokens up to there (K and notes)."""
    import random
    from tinyllama_ref.kvcache import block_key
    cfg = preset("tiny")
    B, n_slots = BLOCK_SIZE, 4

    def row_id(tokens):                       # what a position's K/V depend on: every token up to it
        return hash(tuple(tokens)) % 100003

    for seed in range(60):
        rng = random.Random(seed)
        c = pool(cfg, rng.randint(8, 30), n_slots=n_slots)
        seqs = {}
        for step in range(200):
            op, free_slots = rng.random(), [s for s in range(n_slots) if s not in seqs]
            if op < 0.3 and free_slots:
                base = rng.choice([[5] * 20, [6] * 7 + [5] * 13, list(range(40)), []])
                toks = base[:rng.randint(0, len(base))] + rng.choices((1, 2, 3), k=rng.randint(1, 60))
                total = len(toks) + rng.randint(0, 30)
                if c.can_open(total):
                    c.open(free_slots[0], total)
                    seqs[free_slots[0]] = (toks + [9] * total, total, rng.random() < 0.5)
            elif op < 0.5 and seqs:
                s = rng.choice(list(seqs))
                toks, total, notes = seqs[s]
                prompt = len(toks) - total                            # the part before the 9s
                if int(c.lengths[s]) < prompt - 1 and c.match(s, toks, prompt - 1, need_notes=notes) and notes:
                    c.back_off(s)
            elif op < 0.85 and seqs:
                s = rng.choice(list(seqs))
                toks, total, notes = seqs[s]
                L = int(c.lengths[s])
                n = min(rng.randint(1, 20), total - L)
                if n > 0:
                    c.grow(s, n)
                    kv = np.zeros((n, cfg.n_kv_heads, cfg.head_dim), np.float32)   # [n, KV, hd]
                    kv[:, 0, 0] = [row_id(toks[:L + i + 1]) for i in range(n)]
                    c.write(0, s, L, kv, kv)
                    c.lengths[s] += n
                    c.filled(s, toks[L:L + n], [row_id(toks[:L + i + 1]) for i in range(n)] if notes else None)
            elif seqs:
                s = rng.choice(list(seqs))
                c.close(s)
                del seqs[s]
            refs = [0] * c.n_blocks
            for table in c.tables:
                for b in table:
                    refs[b] += 1
            assert refs == c.refs
            held = {b for b in range(c.n_blocks) if refs[b]}
            assert not held & c.free and not held & set(c.cached) and not c.free & set(c.cached)
            assert len(held) + len(c.free) + len(c.cached) == c.n_blocks
            assert sum(c.promised) <= len(c.free) + len(c.cached)
            assert all(c.key[b] == k and block_key(c.parent[b], c.tokens[b]) == k for k, b in c.full.items())
            for s, (toks, total, notes) in seqs.items():
                L = int(c.lengths[s])
                assert c.recorded[s] == L and len(c.chain[s]) == L // B
                if L:
                    want = [row_id(toks[:p + 1]) for p in range(L)]
                    assert list(c.read(0, s, L)[0][:, 0, 0]) == want, (seed, step)
                    got = c.notes_of(s, 0, L)
                    assert all(n in (None, w) for n, w in zip(got, want)) and (not notes or None not in got)


def test_serve_kv_flags(ckpt, model):
    """--kv-pool and --kv-dtype f16 reach the pool (the startup line says its size), and it serves."""
    import re
    import httpx
    from test_serve import start_server, stop_server
    proc, url = start_server(ckpt, "--kv-pool", "2MB", "--kv-dtype", "f16", "--max-context", "256",
                             "--no-prefix-cache", backend="numpy")
    try:
        r = httpx.post(url + "/generate", timeout=120, json={"inputs": "Aspirin is",
                                                             "parameters": {"max_new_tokens": 4}})
        assert r.status_code == 200, r.text
    finally:
        code, err = stop_server(proc)
    assert code == 0, err
    blocks = 2 * 10**6 // (BLOCK_SIZE * bytes_per_position(model.cfg, "f16"))
    assert f"KV cache {blocks // (256 // BLOCK_SIZE)} sequences x 256 positions (a pool of " \
           f"{blocks * BLOCK_SIZE:,} positions in {blocks:,} blocks of 16" in err, err
    assert re.search(r"blocks of 16, [0-9.]+ MB f16\), no prefix reuse", err), err


def test_a_kv_pool_larger_than_the_budget_names_the_flag(ckpt):
    from tinyllama_ref.memory import current_rss
    from tinyllama_ref.serve.scheduler import Scheduler
    small = tinyllama_ref.load(ckpt, backend="numpy", max_memory=str(current_rss() + 150 * 10**6))
    with pytest.raises(MemoryBudgetError, match="was set by --kv-pool: lower it, or raise --max-memory"):
        Scheduler(small, kv_pool=10**9, log=lambda line: None)
    assert not any(k.startswith("KV cache") for k in small.layers.reserved)    # nothing left reserved
    sch = Scheduler(small, kv_pool=10**7, log=lambda line: None)
    assert small.layers.reserved["KV cache pool"] == sch.cache.nbytes <= 10**7
    sch.cache.close()
    sch.rope.close()
