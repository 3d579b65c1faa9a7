"""Where the decoder layers come from during a forward pass, under a memory budget.

A model is a sequence of layers that arrive from disk. The budget (bytes of resident memory: anonymous
memory plus the mapped file pages this process holds) is split like this:

    budget = process baseline (interpreter, libraries, measured at load)
           + head (final norm, lm_head: read every token, so always resident)
           + reservations (KV cache, activation workspace: made by generate/logits before they run)
           + JIT reserve (numba backend: compiling kernels temporarily takes memory)
           + resident layers (k of them, spread evenly over the depth: mapped once, kept)
           + streaming window (two layers: the one computing and the one being read ahead)

The other layers are streamed: a background thread reads the next streamed layer from disk while the layers
before it compute (it only does I/O, so Numba's threading layer is never entered from two threads). Where the
file system allows it, the read is direct I/O into one of two buffers this process reuses (direct_io.py: the
kernels run faster on them than on freshly filled page-cache pages). Otherwise the layer is read into the page
cache and mapped; after it is used its pages are dropped from this process (madvise MADV_DONTNEED) and from
the page cache (posix_fadvise DONTNEED; platform.py says what stands for each on macOS), so resident memory
does not creep up towards the model size.
(A resident layer whose kernels repacked it drops its mapped source pages too, but keeps them in the page
cache when the whole model fits.)
When everything fits, every layer is resident and nothing streams.

Why spread: with the first k layers resident, the disk sat idle while they computed and the streamed layers
then queued behind it (70B, 20 GB, batch 8 on Zen 5: 2.2 s of resident compute, then 3.4-4.0 s of streamed
compute with 1.6-1.7 s more waiting for the disk). With resident and streamed layers alternating, each read
overlaps the compute of the layers before it: read-ahead one streamed layer deep is enough.
"""

import time
from concurrent.futures import ThreadPoolExecutor

from .direct_io import ALIGN, DirectReader, StagedCheckpoint, slot_bytes
from .errors import MemoryBudgetError
from .memory import current_rss, default_budget, human, parse_size
from .weights import LINEARS, layer_tensor_names, load_layer

JIT_RESERVE = 256 * 10**6          # numba: LLVM's peak while compiling the kernels the first time
SAFETY = 16 * 10**6                # interpreter growth after load (lazy imports, small temporaries) ...
SAFETY_FRACTION = 0.01             # ... plus 1% of the budget for allocator slack
READ_CHUNK = 2**20                 # bytes per pread when reading a layer ahead (one reused buffer)


def spread(k, n):
    """k of the layer indices 0..n-1, evenly spaced, layer 0 among them when k > 0: the resident layers."""
    # Index j counted from the end is taken where floor(j k / n) steps up: exactly k steps, evenly spaced.
    return {n - 1 - j for j in range(n) if (j + 1) * k // n > j * k // n}


class Reservation:
    """Budget set aside for one purpose (KV cache, activations) before allocating it.

    Made by LayerSource.reserve, which counts it at once; use it as a context manager to give the memory
    back when the work is done:  with layers.reserve("KV cache", n): ...
    """

    def __init__(self, source, what):
        self.source, self.what = source, what

    def __enter__(self):
        return self

    def release(self):
        self.source.release_reservation(self.what)

    def __exit__(self, *exc):
        self.release()
        return False


class LayerSource:
    """Iterate to get the layers in order; resident ones are kept, the rest are read, used and released.

    ckpt, cfg, quant_config, backend and gptq_mode say how to build a layer (weights.load_layer);
    fixed_bytes is what the model holds besides its layers (the head), scratch_bytes the largest temporary a
    backend allocates per matmul.
    """

    def __init__(self, ckpt, cfg, quant_config, backend, gptq_mode="exact", max_memory=None, fixed_bytes=0,
                 scratch_bytes=0, cpu=None):
        self.ckpt, self.cfg, self.quant_config = ckpt, cfg, quant_config
        self.backend, self.gptq_mode, self.cpu = backend, gptq_mode, cpu
        self.n_layers = cfg.n_layers
        self.names = [layer_tensor_names(ckpt, i) for i in range(self.n_layers)]
        self.file_bytes = [sum(ckpt.info(n).nbytes for n in names) for names in self.names]
        # Direct reads take each stretch of a layer page-aligned: a slot holds a little more than the layer.
        self.reader = DirectReader(ckpt, max(slot_bytes(ckpt, names) for names in self.names))
        self._staged = {}                  # streamed layer index -> its tensors in a reader slot
        self.budget = default_budget() if max_memory is None else parse_size(max_memory)
        self.budget_given = max_memory is not None
        self.baseline = current_rss()
        self.head_bytes = fixed_bytes
        self.jit_reserve = JIT_RESERVE if backend == "numba" else 0
        self.scratch = scratch_bytes
        self.reserved = {}
        self.resident = {}                 # layer index -> LayerWeights kept for the model's lifetime
        self.prepare_seconds = 0.0         # time spent building layers (incl. kernel layout preparation)
        self.bytes_streamed = 0            # bytes read ahead from disk for streamed layers, cumulative
        self.seconds_reading = 0.0         # wall time the read-ahead thread spent reading them, cumulative
        self._pool = None
        self._pending = {}                 # layer index -> Future of its read-ahead
        self._last_read = None             # the layer the latest read-ahead was for
        self._buffer = None
        self.n_resident = self._plan()

    # -- planning -----------------------------------------------------------------------------------------
    def _fixed(self):
        return (self.baseline + self.head_bytes + self.jit_reserve + self.scratch + sum(self.reserved.values())
                + SAFETY + int(SAFETY_FRACTION * self.budget))

    def _plan(self):
        """How many layers can stay resident (which ones: spread()); raise if not even the streaming window
        fits."""
        free = self.budget - self._fixed()
        if sum(self.file_bytes) <= free:
            return self.n_layers
        window = self.window_bytes()
        if free < window:
            what = ", ".join(f"{k} {human(v)}" for k, v in self.reserved.items())
            raise MemoryBudgetError(
                f"memory budget {human(self.budget)} is too small: this process already uses "
                f"{human(self.baseline)}, the output head needs {human(self.head_bytes)}"
                + (f", JIT compilation {human(self.jit_reserve)}" if self.jit_reserve else "")
                + (f", matmul temporaries {human(self.scratch)}" if self.scratch else "")
                + (f", {what}" if what else "")
                + f", and streaming needs room for two layers ({human(window)}); give at least "
                f"{human(self._fixed() + window, round_up=True)} with --max-memory")
        free -= window
        k = 0
        while k < self.n_layers and self._bytes_of(spread(k + 1, self.n_layers)) <= free:
            k += 1
        return k

    def window_bytes(self):
        """The streaming window: two layers (two reader slots, or two layers of mapped pages) and the
        buffer that reads through the page cache where neither direct I/O nor populate works."""
        return 2 * max(max(self.file_bytes), self.reader.capacity + ALIGN) + READ_CHUNK

    def _bytes_of(self, layers):
        return sum(self.file_bytes[i] for i in layers)

    @property
    def resident_layers(self):
        """The indices of the layers kept in memory (n_resident of them, spread over the depth)."""
        return spread(self.n_resident, self.n_layers)

    def reserve(self, what, nbytes):
        """Set aside memory (KV cache, activations) before allocating it; fewer layers may stay resident.

        Returns a Reservation: `with layers.reserve(...):` releases it at the end of the block.
        """
        self.reserved[what] = nbytes
        try:
            k = self._plan()
        except MemoryBudgetError:
            del self.reserved[what]
            raise
        keep = spread(k, self.n_layers)
        for i in [i for i in self.resident if i not in keep]:
            self._release(i, self.resident.pop(i))
        self.n_resident = k
        return Reservation(self, what)

    def release_reservation(self, what):
        self.reserved.pop(what, None)

    # -- iteration ----------------------------------------------------------------------------------------
    def _build(self, i, streamed=False):
        t = time.perf_counter()
        staged = self._staged.pop(i, None) if streamed else None
        ckpt = self.ckpt if staged is None else StagedCheckpoint(self.ckpt, staged)
        layer = load_layer(ckpt, self.cfg, self.quant_config, self.backend, i, streamed=streamed,
                           gptq_mode=self.gptq_mode, cpu=self.cpu)
        self.prepare_seconds += time.perf_counter() - t
        # Kernels that repacked a tensor at load (act-order rows sorted by group) read their own copy from
        # now on; the mapped file pages of the original would only double the layer's memory. When the
        # whole model fits, the file's pages stay in the page cache (not this process's memory): the next
        # process that loads the model repacks from RAM instead of rereading the disk.
        copied = [n for name in LINEARS for n in getattr(getattr(layer, name), "copied_tensors", ())]
        self.ckpt.drop_pages(copied, page_cache=self.n_resident < self.n_layers)
        return layer

    def __len__(self):
        return self.n_layers

    def __iter__(self):
        keep = self.resident_layers
        streamed = [i for i in range(self.n_layers) if i not in keep]
        following = dict(zip(streamed, streamed[1:]))   # each streamed layer -> the next one
        # Reads left over from a pass that stopped early (an error) are finished and forgotten, except the
        # latest one if it is the first layer this pass needs: a slot they filled may have been reused since.
        for j in list(self._pending):
            if not (streamed and j == streamed[0] == self._last_read):
                self._pending.pop(j).exception()            # waits; a stale failure does not matter
                self._staged.pop(j, None)
        if streamed and streamed[0] not in self._pending:
            self._read_ahead(streamed[0])
        for i in range(self.n_layers):
            if i in keep:
                if i not in self.resident:
                    self.resident[i] = self._build(i)
                yield self.resident[i]
                continue
            self._pending.pop(i).result()             # wait for this layer's bytes to be in memory
            if i in following:
                self._read_ahead(following[i])
            layer = self._build(i, streamed=True)
            yield layer
            self._release(i, layer)

    def _read_ahead(self, i):
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinyllama-readahead")
            self._buffer = bytearray(READ_CHUNK)
        self._pending[i] = self._pool.submit(self._read_layer, i)
        self._last_read = i

    def _read_layer(self, i):
        """I/O only: pull the layer's byte ranges into memory (timed: bytes_streamed / seconds_reading is the
        rate the disk gave the streamer)."""
        t = time.perf_counter()
        staged = self.reader.read(self.names[i])
        if staged is not None:
            self._staged[i] = staged
            self.bytes_streamed += self.file_bytes[i]
        else:
            for name in self.names[i]:
                self.bytes_streamed += self.ckpt.read_ahead(name, self._buffer)
        self.seconds_reading += time.perf_counter() - t

    def _release(self, i, layer):
        """Drop a streamed layer's pages from this process and from the page cache."""
        self.ckpt.drop_pages(self.names[i])
        del layer

    # -- reporting ----------------------------------------------------------------------------------------
    def describe(self):
        streamed = self.n_layers - self.n_resident
        return (f"memory budget {human(self.budget)}{'' if self.budget_given else ' (default)'}: "
                f"{self.n_resident} of {self.n_layers} layers resident "
                f"({human(self.resident_bytes())}), {streamed} streamed from disk "
                f"({human(self.streamed_bytes_per_pass())} per pass)")

    def streamed_bytes_per_pass(self):
        return sum(self.file_bytes) - self.resident_bytes()

    def resident_bytes(self):
        return self._bytes_of(self.resident_layers)
