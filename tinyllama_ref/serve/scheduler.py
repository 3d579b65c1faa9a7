"""Continuous batching: one thread owns the model and advances every active sequence in each pass.

The KV cache is a pool of blocks (kvcache.PagedKVCache), sized from the memory budget and counted in it once at
startup. A request's sequences wait in a queue until one of --max-batch places in the batch is free and the pool
can promise them the blocks their prompt and new tokens may take; they join the running batch at a pass
boundary, take blocks as they grow, and give them back when they finish. Each pass is one Model.forward over a
ragged batch:

    decoding sequences     1 token each (their last sampled token)
    prefilling sequences   the next piece of their prompt, while the pass has room (--prefill-chunk tokens)

so a long prompt is fed over several passes and the sequences already streaming keep getting a token per
pass. Before a prompt piece is planned, the pool is asked for what it already holds of it (an earlier
request's prompt, a finished chat turn: prefix reuse), and a prompt that starts like one still being fed by
an earlier sequence waits for it rather than computing the same positions twice. When the weights stream
from disk a pass costs about the same whatever the batch, which is why sharing it multiplies what one
machine serves.

Every sequence has its own Sampler (its own seeded random generator), so a seed gives the same text
whatever else is in the batch; the batch never changes which random numbers a sequence draws.
"""

import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import MemoryBudgetError, TinyLlamaError
from ..kvcache import MIN_REUSE, PagedKVCache, SlotKVCache, common_prefix, plan_pool
from ..memory import human
from ..ops import log_softmax
from ..sampling import Sampler
from ..templates import StopStrings
from .jobs import Failed, Finished, PromptDone, ServeError, Token


KEPT_TOP = 5       # prompt alternatives the KV pool keeps per position (OpenAI's logprobs go to 5, TGI asks 0)


def top_alternatives(logp, k):
    """The k most likely (id, logprob) pairs of a log-softmax row [V], most likely first."""
    if k <= 0:
        return []
    ids = np.argpartition(-logp, k - 1)[:k] if k < len(logp) else np.arange(len(logp))
    ids = ids[np.argsort(-logp[ids], kind="stable")]
    return [(int(i), float(logp[i])) for i in ids]


@dataclass(eq=False)              # compared and hashed by identity (leaders is keyed by Sequence)
class Sequence:
    """A Job holding a cache slot: where its prompt is, what it has produced, its own sampler and text."""
    job: object
    slot: int
    sampler: Sampler
    seed: int
    decoder: object
    matcher: StopStrings
    fed: int = 0                   # prompt tokens already in the cache
    reused: int = 0                # ... of which the pool already held (prefix reuse)
    leaders: dict = field(default_factory=dict)   # earlier Sequence -> prompt tokens it shares with this one
    tokens: list = field(default_factory=list)
    text: str = ""
    prompt_logprobs: list = None
    prompt_top: list = None
    carry: object = None           # log-softmax row that predicts the next prompt token (chunk boundary)
    next_note: tuple = None        # (logprob, top) of the next prompt token, when the pool gave it (_reuse)
    started: float = field(default_factory=time.perf_counter)

    @property
    def prefilling(self):
        return self.fed < len(self.job.prompt_ids)


class Scheduler:
    """Owns the model, the KV cache and the queue. submit() from any thread; run() in its own thread."""

    def __init__(self, model, max_batch=16, max_queue=64, max_context=None, prefill_chunk=128, metrics=None,
                 log=None, kv_dtype="f32", kv_pool=None, prefix_cache=True):
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_context = min(max_context or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.metrics = metrics
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        # Reserved up front, so serving never grows memory: the activations of the largest pass (a full prefill
        # chunk plus one token per other sequence, every row's logits kept, one sequence's keys and values
        # gathered out of the pool), then the KV pool in what the budget leaves (kvcache.plan_pool).
        c, layers = model.cfg, model.layers
        gathered = 2 * self.max_context * c.n_kv_heads * c.head_dim * 4           # [S, KV, hd] K and V
        layers.reserve("activations", model.workspace_bytes(prefill_chunk + max_batch, self.max_context,
                                                            all_logits=True) + gathered)
        self.rope = None
        if not hasattr(layers, "window_bytes"):              # keys and values live elsewhere (distributed/)
            self.cache = SlotKVCache(model.new_cache(max_batch, self.max_context), c)
            self.prefix_cache = False
            self._queues(max_batch)
            return
        self.rope = model.new_cache(0, self.max_context)    # no slots: the RoPE tables for max_context, counted
        free = layers.budget - layers._fixed()
        try:
            plan = plan_pool(c, free, sum(layers.file_bytes), layers.window_bytes(), max_batch, self.max_context,
                             kv_dtype, kv_pool)
        except MemoryBudgetError:
            self.rope.close()
            raise
        try:                                                 # only a --kv-pool larger than the budget fails here
            reservation = layers.reserve("KV cache pool", plan.nbytes)
        except MemoryBudgetError as e:
            self.rope.close()
            raise MemoryBudgetError(f"{e} (the KV pool of {human(plan.nbytes)} was set by --kv-pool: lower it, "
                                    f"or raise --max-memory)") from None
        self.cache = PagedKVCache(c, plan, max_batch, reservation, prefix_cache)
        self.prefix_cache = prefix_cache
        self._queues(max_batch)

    def _queues(self, max_batch):
        self.free = list(range(max_batch))
        self.waiting = deque()
        self.active = []               # Sequences in the order they joined
        self.cond = threading.Condition()
        self.stopping = False          # no new work; active sequences still finish
        self.aborting = False          # stop now: active sequences are answered with an error
        self.deadline = None           # time.monotonic() after which a shutdown stops waiting for them
        self.thread = None

    # -- called from the HTTP side --------------------------------------------------------------------------
    def submit(self, jobs):
        """Queue a request's jobs together, or refuse them all when the queue is full."""
        for job in jobs:
            if self.cache.blocks_for(self._positions(job)) > self.cache.n_blocks:    # never, after check_length
                raise ServeError(f"{self._positions(job)} positions do not fit the KV pool of "
                                 f"{self.cache.plan.positions}", "validation")
        with self.cond:
            if self.stopping:
                raise ServeError("the server is shutting down", "unavailable")
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise ServeError(f"overloaded: {len(self.waiting)} sequences are already waiting "
                                 f"(--max-queue {self.max_queue}); retry later", "overloaded")
            self.waiting.extend(jobs)
            self._gauges()
            self.cond.notify()

    def start(self):
        self.thread = threading.Thread(target=self.run, name="scheduler", daemon=True)
        self.thread.start()

    def begin_shutdown(self, grace=None):
        """Refuse new work and answer the waiting jobs; the active ones may run for grace more seconds
        (None: to their end), then get an error."""
        with self.cond:
            self.stopping = True
            if grace is not None and self.deadline is None:
                self.deadline = time.monotonic() + grace
            while self.waiting:
                self._emit(self.waiting.popleft(), Failed("the server is shutting down", "unavailable"))
            self.cond.notify()

    def stop(self, timeout=None):
        """Stop after the pass under way: sequences still active are answered with an error."""
        self.begin_shutdown()
        with self.cond:
            self.aborting = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self):
        while True:
            with self.cond:
                self._admit()
                while not self.active and not self.waiting and not self.stopping:
                    self.cond.wait()
                    self._admit()
                if self.stopping and not self.active:
                    break
            if self.aborting or (self.deadline is not None and time.monotonic() > self.deadline):
                for seq in list(self.active):
                    self._leave(seq, Failed("the server is shutting down", "unavailable"), "shutdown")
                break
            if self.active:
                try:
                    self.step()
                except Exception as e:         # an engine bug or a budget error: fail this batch, keep serving
                    message = str(e) if isinstance(e, TinyLlamaError) else f"{type(e).__name__}: {e}"
                    self.log(f"error in a pass: {message}")
                    for seq in list(self.active):
                        self._leave(seq, Failed(f"generation failed: {message}"), "failed")
        self.cache.close()
        if self.rope is not None:
            self.rope.close()

    def _positions(self, job):
        """The most positions a job's sequence can fill: its prompt and every token it may generate."""
        return min(len(job.prompt_ids) + job.max_new_tokens, self.max_context)

    def _admit(self):
        """Give free places in the batch to waiting jobs, oldest first, while the KV pool can promise them
        their blocks (the lock is held). The oldest job waits for blocks rather than being overtaken."""
        while self.waiting and self.free:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                continue
            if not self.cache.can_open(self._positions(job)):
                break
            self.waiting.popleft()
            slot = self.free.pop(0)
            self.cache.open(slot, self._positions(job))
            params, seed = job.params, job.params.seed
            if not params.greedy and seed is None:
                seed = random.randrange(2**63)  # reported back, so the client can reproduce the text
                params = params.with_seed(seed)
            seq = Sequence(
                job=job, slot=slot, sampler=Sampler(params), seed=None if params.greedy else seed,
                decoder=self.tokenizer.stream_decoder(skip_special_tokens=True, context_ids=job.prompt_ids),
                matcher=StopStrings(job.stop_strings),
                prompt_logprobs=[None] if job.prompt_logprobs >= 0 else None,
                prompt_top=[None] if job.prompt_logprobs >= 0 else None)
            if self.prefix_cache and job.prompt_logprobs <= KEPT_TOP:
                for o in self.active:      # prompts still being fed that start like this one (and give the
                    if o.prefilling and (job.prompt_logprobs < 0 or o.job.prompt_logprobs >= 0):  # logprobs)
                        n = common_prefix(o.job.prompt_ids, job.prompt_ids)
                        if n > 0:
                            seq.leaders[o] = n
            self.active.append(seq)
        self._gauges()

    def _reuse(self, s):
        """Before planning a prompt piece: take what the pool holds of it. True if s should wait this pass
        for an earlier sequence that is still computing positions s could take from it.

        A job that wants its prompt's logprobs takes only positions that come with them (the notes
        _score_prompt leaves in the pool) and one position fewer than it could: the last one is computed
        again, since its logits give the next prompt token's logprob."""
        k = s.job.prompt_logprobs
        if not self.prefix_cache or k > KEPT_TOP:
            return False
        limit = len(s.job.prompt_ids) - 1          # the last prompt token is always computed: its logits
        got = self.cache.match(s.slot, s.job.prompt_ids, limit, need_notes=k >= 0)  # give the first new token
        if got and k >= 0:
            notes = self.cache.notes_of(s.slot, s.fed, s.fed + got)      # positions fed .. fed + got - 1
            self.cache.back_off(s.slot)
            got -= 1
            for p, (logprob, top) in zip(range(s.fed, s.fed + got), notes):
                if p > 0:                          # nothing predicts the first token: it stays None
                    s.prompt_logprobs.append(logprob)
                    s.prompt_top.append(top[:k])
            s.next_note = notes[-1] if s.fed + got > 0 else None
        if got:
            s.fed += got
            s.reused += got
            if self.metrics:
                self.metrics.prefix_reused(got)
        for o, n in list(s.leaders.items()):
            if o not in self.active or not o.prefilling or o.fed >= n:
                del s.leaders[o]                   # gone, or what it shares with s is in the pool now
        return any(min(n, limit) - s.fed >= MIN_REUSE for n in s.leaders.values())

    def _plan(self):
        """(sequence, new token ids) for this pass: every decoding sequence, then prompt pieces that fit."""
        plan = [(s, np.array([s.tokens[-1]])) for s in self.active if not s.prefilling]
        room = self.prefill_chunk - len(plan)          # a pass holds at most prefill_chunk tokens ...
        for s in self.active:
            if s.prefilling and (room > 0 or not plan) and not self._reuse(s):  # ... unless that leaves no room
                n = min(len(s.job.prompt_ids) - s.fed, max(room, 1))
                plan.append((s, np.asarray(s.job.prompt_ids[s.fed:s.fed + n])))
                room -= n
        return plan

    def step(self):
        """One pass over the weights for the whole batch, then one sampling step per sequence."""
        for s in [s for s in self.active if s.job.cancelled]:
            self._leave(s, None, "cancelled")
        plan = self._plan()
        if not plan:
            return
        all_logits = any(s.prefilling and s.job.prompt_logprobs >= 0 for s, _ in plan)
        for s, chunk in plan:
            self.cache.grow(s.slot, len(chunk))                # blocks for the positions this pass writes
        t = time.perf_counter()
        logits = self.model.forward([c for _, c in plan], self.cache, [s.slot for s, _ in plan],
                                    all_logits=all_logits)     # [sum of lengths or B, V]
        seconds = time.perf_counter() - t
        if self.metrics:
            self.metrics.prefill_done(sum(len(c) for s, c in plan if s.prefilling))
        ends = np.cumsum([len(c) for _, c in plan])            # [B] one past each sequence's last row
        for k, (s, chunk) in enumerate(plan):
            rows = logits[ends[k] - len(chunk):ends[k]] if all_logits else logits[k:k + 1]   # [n or 1, V]
            notes = self._score_prompt(s, rows, chunk) if s.prefilling and s.prompt_logprobs is not None else None
            self.cache.filled(s.slot, chunk, notes)            # the written blocks' tokens, for prefix reuse
            if s.prefilling:
                s.fed += len(chunk)
                if s.prefilling:
                    continue
                if s.job.max_new_tokens == 0:                  # prompt logprobs only (OpenAI echo)
                    self._leave(s, Finished("length", "", [], len(s.job.prompt_ids), s.seed,
                                            time.perf_counter() - s.started), "length")
                    continue
            self._sample(s, rows[-1])
        if self.metrics:
            with self.cond:
                self.metrics.pass_done(seconds, len(plan), len(self.waiting), len(self.active))

    def _score_prompt(self, s, rows, chunk):
        """Log p(prompt token | tokens before it) for this chunk, as OpenAI's echo and TGI's prefill show.
        Returns each position's (logprob, top KEPT_TOP alternatives): the pool keeps them with its row."""
        logp = log_softmax(rows.astype(np.float64), axis=-1)   # [n, V]: row i predicts prompt[fed + i + 1]
        k, notes = s.job.prompt_logprobs, []
        for i, target in enumerate(chunk):
            p = s.fed + i
            if p == 0:
                note = (None, [])                              # nothing predicts the first token
            elif i == 0 and s.next_note is not None:
                note, s.next_note = s.next_note, None          # the pool's, with the positions before it
            else:                                              # chunk[0] was predicted by the last chunk
                row = s.carry if i == 0 else logp[i - 1]
                note = (float(row[target]), top_alternatives(row, max(k, KEPT_TOP)))
            notes.append(note)
            if p > 0:
                s.prompt_logprobs.append(note[0])
                s.prompt_top.append(note[1][:k])
        s.carry = logp[-1]
        if s.fed + len(chunk) == len(s.job.prompt_ids):
            self._emit(s.job, PromptDone(s.prompt_logprobs, s.prompt_top))
        return notes

    def _sample(self, s, row):
        """Draw the next token, turn it into text, and decide whether the sequence is over."""
        job = s.job
        token = s.sampler.sample(row, job.prompt_ids + s.tokens)
        s.tokens.append(token)
        logp = log_softmax(row.astype(np.float64))              # [V]
        special = token in job.stop_ids or self._is_special(token)
        finish = None
        if token in job.stop_ids:
            finish = "eos"
        elif len(s.tokens) >= job.max_new_tokens or len(job.prompt_ids) + len(s.tokens) >= self.max_context:
            finish = "length"
        piece = "" if token in job.stop_ids else s.decoder.push(token)
        if finish:
            piece += s.decoder.flush()
        shown, hit = s.matcher.push(piece)
        if hit:
            finish = "stop"
        elif finish:
            shown += s.matcher.flush()
        s.text += shown
        self._emit(job, Token(token, shown, float(logp[token]), bool(special),
                              top_alternatives(logp, job.top_logprobs) if job.top_logprobs >= 0 else None))
        if finish:
            self._leave(s, Finished(finish, s.text, list(s.tokens), len(job.prompt_ids), s.seed,
                                    time.perf_counter() - s.started), finish)

    def _is_special(self, token):
        """<s>, </s> and added tokens marked special (TGI's "special" flag)."""
        tok = self.tokenizer
        if token in tok.added_by_id:
            return bool(tok.added_by_id[token].special)
        return 0 <= token < tok.n_sp and tok.sp.is_control(token)

    def _leave(self, s, event, reason="error"):
        """The sequence is done: give its slot back, tell its route, write the request's log line."""
        with self.cond:
            self.active.remove(s)
            self.cache.close(s.slot)
            self.free.append(s.slot)
            self._gauges()
        if event is not None:
            self._emit(s.job, event)
        if self.metrics and isinstance(event, Finished):
            self.metrics.sequence_done(event.finish_reason, len(s.job.prompt_ids), len(s.tokens))
        reused = f", {s.reused} prompt tokens reused" if s.reused else ""
        self.log(f"request {s.job.id}: {len(s.job.prompt_ids)} prompt tokens, {len(s.tokens)} new tokens, "
                 f"{time.perf_counter() - s.job.submitted:.2f} s, {reason}{reused}")

    def _emit(self, job, event):
        if job.on_event is not None:
            job.on_event(event)

    def _gauges(self):
        if self.metrics:
            self.metrics.set_queue(len(self.waiting), len(self.active))
            self.metrics.set_pool(*self.cache.usage())
