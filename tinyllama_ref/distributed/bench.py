"""What a pipeline costs: decode passes through K stages against the same model in one process.

    python -m tinyllama_ref.distributed.bench CKPT --stages 2 --batch 1 --passes 16 [--address HOST:6379]

Measured, per decode pass (greedy, one new token per sequence): the single process's time, the pipeline's
time, the compute time inside each stage (Stage.stats), and so the pipeline's overhead (pass time minus
the stages' compute: Ray calls, serialisation, the driver). Counted: the bytes that travel per pass
(activations [B, D] float32 between stages, token ids in, logits [B, V] float32 out).

Projected, for the same architecture with more layers over K machines (e.g. 70B: --project-layers 80):
one pass visits every stage in turn, so s/token at batch 1 = layers x (measured compute per layer)
+ head + K x (measured overhead per hop). The per-layer time is measured here with resident layers; on
K real machines each stage reads its own memory, so the figure holds if each node has this one's memory
bandwidth; the head's time is spread over the layers (a slight over-estimate). Micro-batches (batch >= K)
overlap the stages, which raises tokens/s, not s/token.
"""

import argparse
import json
import time

import numpy as np


def decode_passes(model, batch, passes, prompt_len=8, after_prefill=None):
    """Seconds per decode pass (median) and all of them, after a prefill of `prompt_len` tokens per sequence."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.cfg.vocab_size, size=prompt_len) for _ in range(batch)]
    times = []
    with model.new_cache(batch, prompt_len + passes + 1) as cache:
        logits = model.forward(prompts, cache, list(range(batch)))                  # [B, V]
        if after_prefill:
            after_prefill()
        for _ in range(passes):
            nxt = [np.array([int(t)]) for t in np.argmax(logits, axis=-1)]
            t = time.perf_counter()
            logits = model.forward(nxt, cache, list(range(batch)))                  # [B, V]
            times.append(time.perf_counter() - t)
    return float(np.median(times)), times


def run(path, stages, batch, passes, address, backend, max_memory, project_layers):
    import ray

    import tinyllama_ref
    from .pipeline import PipelineModel
    local = tinyllama_ref.load(path, backend=backend, max_memory=max_memory)
    single, _ = decode_passes(local, batch, passes)
    cfg = local.cfg
    del local
    pipe = PipelineModel(path, stages=stages, backend=backend, max_memory=max_memory, address=address)
    try:
        decode_passes(pipe, batch, 2)                                                # warm up the stages
        reset = lambda: ray.get([s.stats.remote() for s in pipe.stages])             # noqa: E731
        piped, times = decode_passes(pipe, batch, passes, after_prefill=reset)
        stats = ray.get([s.stats.remote() for s in pipe.stages])                     # [(calls, seconds)]
    finally:
        pipe.close()
    compute = [sec / calls for calls, sec in stats]                                  # mean per decode call
    overhead = piped - sum(compute)
    layers = [b - a for a, b in pipe.layers.ranges]
    per_layer = sum(compute) / cfg.n_layers
    moved = {"activations_bytes_per_hop": batch * cfg.dim * 4, "hops": stages - 1,
             "ids_bytes_in": batch * 8, "logits_bytes_out": batch * cfg.vocab_size * 4}
    out = {"checkpoint": path, "stages": stages, "layers_per_stage": layers, "batch": batch, "passes": passes,
           "single_process_s_per_pass": single, "pipeline_s_per_pass": piped,
           "stage_compute_s_per_call": compute, "pipeline_overhead_s_per_pass": overhead,
           "overhead_s_per_stage_call": overhead / stages, **moved}
    if project_layers:
        for k in (2, 4):
            out[f"projected_s_per_token_{project_layers}_layers_{k}_machines"] = \
                project_layers * per_layer + k * overhead / stages
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--passes", type=int, default=16)
    ap.add_argument("--address", default="local", help="local (a private cluster), auto or HOST:6379")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--project-layers", type=int, default=None, help="e.g. 80 for a 70B of this layer shape")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.checkpoint, args.stages, args.batch, args.passes, args.address, args.backend,
                         args.max_memory, args.project_layers), indent=1))


if __name__ == "__main__":
    main()
