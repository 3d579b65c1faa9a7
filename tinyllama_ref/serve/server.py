"""The server's state: the model loads in the scheduler's own thread while HTTP already answers /health.

Also the checks both APIs share (model name, prompt length against the context, token ids), so a TGI and an
OpenAI request with the same mistake get the same message.
"""

import os
import sys
import threading
import time
from dataclasses import dataclass

from ..errors import TinyLlamaError
from ..memory import parse_size
from .jobs import ServeError
from .metrics import Metrics

# huggingface_hub's InferenceClient sends these as the model when it talks to a URL rather than a Hub id.
CLIENT_PLACEHOLDER_MODELS = ("tgi", "dummy")


@dataclass
class Options:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8080
    max_memory: str = None
    max_batch: int = 16
    max_queue: int = 64
    max_context: int = None
    prefill_chunk: int = 128
    kv_dtype: str = "f32"              # the KV pool's storage: "f16" halves it (kvcache.py)
    kv_pool: str = None                # its size ("2GB"); None: from the budget (kvcache.plan_pool)
    prefix_cache: bool = True
    template: str = "auto"
    gptq_mode: str = "exact"
    backend: str = "numba"
    model_name: str = None
    shutdown_timeout: float = 30.0     # seconds running requests may take to finish after SIGTERM


class ServerState:
    def __init__(self, options, log=None):
        self.options = options
        self.name = options.model_name or os.path.basename(os.path.normpath(options.checkpoint))
        self.metrics = Metrics()
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.status = "loading"          # -> "ready" | "failed" | "stopped"
        self.error = None
        self.model = self.scheduler = self.template = None
        self.created = int(time.time())
        self.on_failure = None           # called (from the loading thread) when the model cannot load
        self.thread = None

    # -- life cycle -------------------------------------------------------------------------------------------
    def start(self):
        self.thread = threading.Thread(target=self._load_and_run, name="scheduler", daemon=True)
        self.thread.start()

    def _load_and_run(self):
        import tinyllama_ref
        from ..templates import check_template, default_template
        from .scheduler import Scheduler
        o = self.options
        try:
            t = time.perf_counter()
            model = tinyllama_ref.load(o.checkpoint, backend=o.backend, max_memory=o.max_memory,
                                       gptq_mode=o.gptq_mode, quiet=True)
            tokenizer = model.tokenizer
            self.template = default_template(tokenizer) if o.template == "auto" else check_template(o.template)
            scheduler = Scheduler(model, o.max_batch, o.max_queue, o.max_context, o.prefill_chunk, self.metrics,
                                  self.log, kv_dtype=o.kv_dtype,
                                  kv_pool=None if o.kv_pool is None else parse_size(o.kv_pool),
                                  prefix_cache=o.prefix_cache)
        except (TinyLlamaError, MemoryError, OSError) as e:
            self.status, self.error = "failed", str(e) or type(e).__name__
            self.log(f"error: {self.error}")
            if self.on_failure:
                self.on_failure()
            return
        self.model, self.scheduler = model, scheduler
        if self.status == "loading":     # not shut down while loading
            self.status = "ready"
        self.log(f"serving {self.name} at http://{o.host}:{o.port} (loaded in {time.perf_counter() - t:.1f} s; "
                 f"template {self.template}; {scheduler.cache.plan.describe()}"
                 f"{'' if o.prefix_cache else ', no prefix reuse'}; {model.layers.describe()})")
        scheduler.run()

    def begin_shutdown(self):
        """Ctrl-C / SIGTERM: refuse new requests, answer the waiting ones, give the running ones
        --shutdown-timeout seconds to finish before they are answered with an error."""
        if self.status in ("loading", "ready"):
            self.status = "stopped"
        if self.scheduler is not None:
            self.scheduler.begin_shutdown(self.options.shutdown_timeout)

    def stop(self, timeout=30):
        self.begin_shutdown()
        if self.scheduler is not None:
            self.scheduler.stop(timeout)

    # -- checks the routes share ------------------------------------------------------------------------------
    def ready(self):
        """The scheduler, or ServeError 503 while loading / after a failure / during shutdown."""
        if self.status == "ready":
            return self.scheduler
        if self.status == "loading":
            raise ServeError("the model is still loading; retry when GET /health answers 200", "unavailable")
        if self.status == "failed":
            raise ServeError(f"the model failed to load: {self.error}", "unavailable")
        raise ServeError("the server is shutting down", "unavailable")

    def check_model(self, name):
        if name in (None, self.name, self.options.checkpoint, *CLIENT_PLACEHOLDER_MODELS):
            return
        raise ServeError(f"model {name!r} is not served here; this server serves {self.name!r} "
                         f"(see GET /v1/models)", "not_found")

    @property
    def max_context(self):
        return self.scheduler.max_context

    def check_ids(self, ids, what="prompt"):
        """Refuse ids outside the vocabulary and empty prompts."""
        if not ids:
            raise ServeError(f"the {what} is empty: give some text or at least one token id")
        vocab = self.model.cfg.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ServeError(f"token id {bad[0]} in the {what} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def check_length(self, prompt_ids, max_new_tokens, field="max_new_tokens"):
        """The prompt plus the tokens asked for must fit the context (and the cache's slots)."""
        ctx = self.max_context
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ServeError(f"{field} must be a whole number >= 0, got {max_new_tokens!r}")
        if len(prompt_ids) >= ctx:
            raise ServeError(f"the prompt has {len(prompt_ids)} tokens; the context is {ctx} positions, leaving "
                             f"no room to generate (shorten the prompt, or use truncate)")
        if len(prompt_ids) + max_new_tokens > ctx:
            raise ServeError(f"the prompt has {len(prompt_ids)} tokens and {field} is {max_new_tokens}: "
                             f"{len(prompt_ids) + max_new_tokens} positions exceed the context of {ctx}; "
                             f"ask for at most {ctx - len(prompt_ids)} new tokens")


def token_pieces(tokenizer, ids):
    """The text each token adds when the ids are decoded in order (joined, they are the decoded text)."""
    stream = tokenizer.stream_decoder(skip_special_tokens=False)
    pieces = [stream.push(i) for i in ids]
    if pieces:
        pieces[-1] += stream.flush()
    return pieces


def token_text(tokenizer, i):
    """One token's own text, out of context (for the top alternatives): its piece with '▁' as a space."""
    try:
        return tokenizer.id_to_piece(i).replace("\u2581", " ")
    except TinyLlamaError:
        return ""
