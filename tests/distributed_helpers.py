"""Shared by the distributed tests: the Ray fixture, the reference's thread count, a unit of work with a gate."""

import os
import time

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance (2 CPUs, loopback only) for every distributed test module of the session."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        try:
            ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        except Exception as e:                                # depends on the machine
            pytest.skip(f"Ray cannot start a local instance here: {e}")
        # The test-only work functions below live in tests/, which workers cannot import: send them by value.
        import distributed_helpers
        ray.cloudpickle.register_pickle_by_value(distributed_helpers)
    yield ray
    if ray.is_initialized():
        ray.shutdown()


def blas_threads():
    """The BLAS threads of this (the reference's) process: actors started with as many compute the same bits
    (float sums split over another number of threads differ in the last bits; see workers.actor_options)."""
    import numpy  # noqa: F401  (loads OpenBLAS)
    from threadpoolctl import threadpool_info
    return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")


class GatedWork:
    """work(model, items, start), except that the chunk starting at `gated_start` first writes
    gate_dir/started (with this actor's id) and then waits for gate_dir/open: the test kills the actor while it
    is inside the chunk for certain, then opens the gate for the worker that redoes it."""

    def __init__(self, work, gate_dir, gated_start):
        self.work, self.gate_dir, self.gated_start = work, gate_dir, gated_start

    def __call__(self, model, items, start):
        if start == self.gated_start:
            import ray
            with open(os.path.join(self.gate_dir, "started.partial"), "w") as f:
                f.write(ray.get_runtime_context().get_actor_id())
            os.replace(os.path.join(self.gate_dir, "started.partial"), os.path.join(self.gate_dir, "started"))
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(self.gate_dir, "open")):
                if time.monotonic() > deadline:
                    raise RuntimeError("the test never opened the gate")
                time.sleep(0.02)
        return self.work(model, items, start)
