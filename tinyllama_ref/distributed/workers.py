"""A data-parallel worker: a Ray actor that loads the checkpoint once and runs units of work on it.

Every node reads the checkpoint from the same path (a shared filesystem, or a copy at the same place on
each machine) and keeps its own memory budget: one worker is one `tinyllama_ref.load(...)` on its node.

A unit of work is a plain function `work(model, items, start) -> one result per item` (start: where the items
begin in the whole input), picklable: defined at module level, or a functools.partial of one: see tasks.py
for the ones the commands use.
"""

import os
import socket

from ..errors import TinyLlamaError


class Worker:
    """The actor's class (wrapped with ray.remote by start_worker). A load error is kept, not raised, so the
    actor stays up to report it: a constructor that raises would only show as a dead actor."""

    def __init__(self, path, backend, max_memory, gptq_mode, threads=None):
        import tinyllama_ref
        self.error = None
        try:
            self.model = tinyllama_ref.load(path, backend=backend, max_memory=max_memory, gptq_mode=gptq_mode,
                                            threads=threads)
        except TinyLlamaError as e:
            self.error = type(e)(f"worker on {socket.gethostname()}: {e}")

    def ready(self):
        """Where this worker runs (host, pid), once its model is loaded; raises its load error."""
        if self.error is not None:
            raise self.error
        return socket.gethostname(), os.getpid()

    def run(self, work, items, start):
        """work(model, items, start): the results of items[start:start + len(items)] of the whole input."""
        if self.error is not None:
            raise self.error
        return list(work(self.model, items, start))

    def call(self, fn):
        """fn(model) on this worker's model: a question about it (its default batch size, its budget)."""
        if self.error is not None:
            raise self.error
        return fn(self.model)


def actor_options(cpus, threads):
    """Ray options of a worker or stage. cpus: the cores Ray reserves for it; threads: its BLAS/OpenMP
    threads (default: Ray's, OMP_NUM_THREADS = cpus). SPREAD puts actors on different nodes first, so each
    uses its own machine's cores and memory. Ray never restarts them: the runner starts replacements.

    The thread count is fixed when the process starts (OpenBLAS reads it once) and float sums split over
    a different number of threads differ in the last bits: an actor with T threads gives the bits of one
    process running with T threads."""
    from ..threads import parse_threads
    opts = dict(num_cpus=cpus, max_restarts=0, scheduling_strategy="SPREAD")
    fixed = parse_threads(threads)                     # None for "auto"
    if fixed:
        opts["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(fixed)}}
    return opts


def start_worker(path, backend="numba", max_memory=None, gptq_mode="exact", cpus=1, threads=None):
    """A new Worker actor; it loads in the background (ready() says when)."""
    import ray
    return ray.remote(Worker).options(**actor_options(cpus, threads)).remote(path, backend, max_memory, gptq_mode,
                                                                             threads)

