"""Counters for GET /metrics, written in the Prometheus text exposition format (version 0.0.4).

Everything is updated from two threads (the event loop and the scheduler), so one lock guards it all; the
numbers are small and updates are rare next to a pass over the weights.
"""

import threading
from collections import defaultdict

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PASS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60)


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name):
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.http = defaultdict(int)          # (route, status) -> responses
        self.finished = defaultdict(int)      # finish reason -> sequences
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.queue_depth = 0
        self.active = 0
        self.prefill_tokens = 0               # prompt positions run through the model
        self.reused_tokens = 0                # prompt positions the KV pool already held (prefix reuse)
        self.pool = (0, 0, 0)                 # KV blocks: held by sequences, cached for reuse, free
        self.passes = Histogram(PASS_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)

    def response(self, route, status):
        with self.lock:
            self.http[(route, status)] += 1

    def sequence_done(self, reason, prompt_tokens, new_tokens):
        with self.lock:
            self.finished[reason] += 1
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += new_tokens

    def pass_done(self, seconds, batch_size, queue_depth, active):
        with self.lock:
            self.passes.observe(seconds)
            self.batch.observe(batch_size)
            self.queue_depth, self.active = queue_depth, active

    def prefill_done(self, tokens):
        with self.lock:
            self.prefill_tokens += tokens

    def prefix_reused(self, tokens):
        with self.lock:
            self.reused_tokens += tokens

    def set_pool(self, held, cached, free):
        with self.lock:
            self.pool = (held, cached, free)

    def set_queue(self, queue_depth, active):
        with self.lock:
            self.queue_depth, self.active = queue_depth, active

    def render(self):
        with self.lock:
            out = ["# HELP tinyllama_requests_total HTTP responses by route and status code.",
                   "# TYPE tinyllama_requests_total counter"]
            out += [f'tinyllama_requests_total{{route="{r}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.http.items())]
            out += ["# HELP tinyllama_sequences_total Generated sequences by finish reason.",
                    "# TYPE tinyllama_sequences_total counter"]
            out += [f'tinyllama_sequences_total{{finish_reason="{k}"}} {n}' for k, n in sorted(self.finished.items())]
            out += ["# HELP tinyllama_prompt_tokens_total Prompt tokens of finished sequences.",
                    "# TYPE tinyllama_prompt_tokens_total counter",
                    f"tinyllama_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP tinyllama_generated_tokens_total New tokens of finished sequences.",
                    "# TYPE tinyllama_generated_tokens_total counter",
                    f"tinyllama_generated_tokens_total {self.generated_tokens}",
                    "# HELP tinyllama_prefill_tokens_total Prompt tokens computed by forward passes.",
                    "# TYPE tinyllama_prefill_tokens_total counter",
                    f"tinyllama_prefill_tokens_total {self.prefill_tokens}",
                    "# HELP tinyllama_prefix_reused_tokens_total Prompt tokens taken from the KV pool instead.",
                    "# TYPE tinyllama_prefix_reused_tokens_total counter",
                    f"tinyllama_prefix_reused_tokens_total {self.reused_tokens}",
                    "# HELP tinyllama_kv_blocks KV pool blocks by state.",
                    "# TYPE tinyllama_kv_blocks gauge"]
            out += [f'tinyllama_kv_blocks{{state="{k}"}} {n}'
                    for k, n in zip(("held", "cached", "free"), self.pool)]
            out += ["# HELP tinyllama_queue_depth Sequences waiting for a place in the batch and KV blocks.",
                    "# TYPE tinyllama_queue_depth gauge", f"tinyllama_queue_depth {self.queue_depth}",
                    "# HELP tinyllama_active_sequences Sequences in the running batch.",
                    "# TYPE tinyllama_active_sequences gauge", f"tinyllama_active_sequences {self.active}",
                    "# HELP tinyllama_pass_seconds Seconds per forward pass over the weights.",
                    "# TYPE tinyllama_pass_seconds histogram"]
            out += self.passes.lines("tinyllama_pass_seconds")
            out += ["# HELP tinyllama_batch_size Sequences advanced by one forward pass.",
                    "# TYPE tinyllama_batch_size histogram"]
            out += self.batch.lines("tinyllama_batch_size")
            return "\n".join(out) + "\n"
