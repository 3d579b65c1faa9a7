"""The data-parallel driver: items cut into chunks of about equal tokens, run on a pool of worker actors,
results handed back one by one in input order.

    with DataParallel("ckpt", workers=4, address="auto") as pool:
        for i, result in pool.map(work, items, costs=[tokens per item]):    # work(model, items, start)
            write(i, result)                       # in input order, as soon as everything before i is done

Each worker holds one chunk at a time. When a worker dies (its node went away, it ran out of memory, someone
ran `ray.kill` on it) its chunk goes back to the front of the queue and a fresh worker takes its place, so
every chunk's results come from exactly one complete run: nothing is lost, nothing is counted twice. An
error in the work itself (a prompt too long for the context) is not retried: it is raised at once.
"""

import os
from collections import deque

from .cluster import DistributedError, check_fits, connect, remote_error, stop_actors
from .shard import chunk_ranges
from .workers import start_worker

MAX_ATTEMPTS = 3      # runs of one chunk on workers that died before it finished, before giving up


class DataParallel:
    """A pool of `workers` actors, each with the checkpoint at `path` loaded under its own max_memory.

    address: the Ray cluster (cluster.connect: "auto", "local" or the head's HOST:6379).
    cpus_per_worker: the cores Ray reserves for each worker (give a node's core count for one per node);
    threads: each worker's BLAS/OpenMP threads (default: cpus_per_worker; see workers.actor_options).
    """

    def __init__(self, path, workers=2, backend="numba", max_memory=None, gptq_mode="exact", address="auto",
                 cpus_per_worker=1, threads=None, max_attempts=MAX_ATTEMPTS):
        if not isinstance(workers, int) or workers < 1:
            raise DistributedError(f"--workers must be a whole number >= 1, got {workers!r}")
        self.ray = connect(address)
        self.spec = dict(path=os.path.abspath(path), backend=backend, max_memory=max_memory, gptq_mode=gptq_mode,
                         cpus=cpus_per_worker, threads=threads)
        self.max_attempts = max_attempts
        check_fits(self.ray, workers, cpus_per_worker, "workers")
        self.replaced = 0                  # workers started to replace dead ones, over the pool's life
        self.actors = [start_worker(**self.spec) for _ in range(workers)]
        self.hosts = self._wait_ready(self.actors)

    def _wait_ready(self, actors):
        """Block until every worker has loaded its model; raise the first load error (one line)."""
        try:
            return self.ray.get([a.ready.remote() for a in actors])
        except self.ray.exceptions.RayTaskError as e:
            self.close()
            raise remote_error(e) from None
        except self.ray.exceptions.RayActorError as e:
            self.close()
            raise DistributedError(f"a worker died while loading {self.spec['path']}: {e}") from None

    def map(self, work, items, costs=None, progress=None, boundaries=None):
        """Yield (index, result) for every item, in input order.

        work(model, items[a:b], a) -> a result per item, run on a worker. costs: each item's size in tokens
        (balances the chunks; default 1 each). boundaries: the only indices a chunk may start at (e.g. where
        a single-process run's batches start, so each chunk is whole batches and gives the same bits).
        progress: a progress.Progress counting the cost of the finished chunks, across all workers.
        """
        ray = self.ray
        items = list(items)
        costs = [1] * len(items) if costs is None else list(costs)
        chunks = chunk_ranges(costs, len(self.actors), boundaries)       # [(start, stop)] in input order
        chunk_cost = [sum(costs[a:b]) for a, b in chunks]
        queue = deque(range(len(chunks)))
        attempts = [0] * len(chunks)
        idle = list(self.actors)
        in_flight = {}                     # ObjectRef -> (chunk index, actor)
        finished = {}                      # chunk index -> its results, until they are handed out
        done_cost, next_out = 0, 0

        def submit():
            while queue and idle:
                c, actor = queue.popleft(), idle.pop(0)
                a, b = chunks[c]
                in_flight[actor.run.remote(work, items[a:b], a)] = (c, actor)

        try:
            submit()
            while next_out < len(chunks):
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                c, actor = in_flight.pop(ref)
                try:
                    results = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                    attempts[c] += 1
                    if attempts[c] >= self.max_attempts:
                        raise DistributedError(f"items {chunks[c][0] + 1}-{chunks[c][1]}: {attempts[c]} workers "
                                               f"died running them (last: {type(e).__name__}); giving up") from None
                    queue.appendleft(c)                                  # redo it first, on a fresh worker
                    idle.append(self._replace(actor))
                    submit()
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise remote_error(e) from None
                a, b = chunks[c]
                if len(results) != b - a:
                    raise DistributedError(f"items {a + 1}-{b}: a worker returned {len(results)} results "
                                           f"for {b - a} items")
                finished[c] = results
                idle.append(actor)
                submit()                                                 # keep the workers busy first
                done_cost += chunk_cost[c]
                if progress is not None:
                    progress.update(done_cost, sum(chunk_cost), note=f"{len(self.actors)} workers")
                while next_out in finished:
                    for i, r in enumerate(finished.pop(next_out), chunks[next_out][0]):
                        yield i, r
                    next_out += 1
        finally:
            for ref in in_flight:          # an early exit (error, consumer stopped): drop the pending work
                try:
                    ray.cancel(ref, force=False)
                except Exception:              # finished or its worker gone meanwhile: nothing to drop
                    pass

    def call(self, fn):
        """fn(model) on every worker: their answers (e.g. each one's default batch size under its budget)."""
        try:
            return self.ray.get([a.call.remote(fn) for a in self.actors])
        except self.ray.exceptions.RayTaskError as e:
            raise remote_error(e) from None

    def _replace(self, dead):
        """Start a worker in place of a dead one (Ray places it on any node with room)."""
        self.ray.kill(dead, no_restart=True)
        fresh = start_worker(**self.spec)
        self.actors[self.actors.index(dead)] = fresh
        self.replaced += 1
        return fresh

    def close(self):
        """Stop the workers (their memory goes back to their nodes)."""
        stop_actors(self.ray, self.actors)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
