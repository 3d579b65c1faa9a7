"""Test-only units of work for the data-parallel runner (shipped to Ray workers by value, see the tests)."""

import os
import time


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
