"""What a pipeline costs: decode passes through K stages against the same model in one process.

    python -m tinyllama_ref.distributed.bench CKPT --stages 2 --batch 1 --passes 16 [--target llama2-70b]
        [--address HOST:6379]

Measured, per decode pass (greedy, one new token per sequence): the single process's time, the pipeline's
time, the compute time inside each stage (Stage.stats), and so the pipeline's overhead (pass time minus
the stages' compute: Ray calls, serialisation, the driver). Counted: the bytes that travel per pass
(activations [B, D] float32 between stages, token ids in, logits [B, V] float32 out).

Projected, for a target model over K machines (--target llama2-70b: the preset's shape with the measured
checkpoint's GPTQ settings). A batch-1 decode pass reads every weight once and is bound by memory bandwidth,
so the stages' measured compute is turned into seconds per weight byte (compute / the bytes of the layers
and the head the pass read) and scaled by the target's bytes per token; one pass visits every stage in turn,
so s/token = target bytes x s/byte + K x (measured overhead per stage call). It holds if each of the K nodes
reads memory as fast as this one and the target's layers fit their memory (no streaming); the activations
between stages grow with the target's width (8192 x 4 bytes a row for 70B) but stay small beside the
per-call overhead. Measure on a checkpoint whose layers are bigger than the CPU caches (the 7B shape): a
tiny model runs from cache and gives a rate no large model reaches. Micro-batches (batch >= K) overlap the
stages, which raises tokens/s, not s/token.
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


def weight_bytes_per_token(cfg, quant_config, float_dtype="F16"):
    """(bytes of one decoder layer, bytes of the head) a decode pass reads, for a config and GPTQ settings
    (the same tensor list synth writes: make/synth.model_plan)."""
    from dataclasses import replace
    from ..make.synth import model_plan
    plan = model_plan(replace(cfg, n_layers=1), quant_config, float_dtype)
    layer = sum(p.spec.nbytes for p in plan if p.spec.name.startswith("model.layers.0."))
    head = next(p.spec.nbytes for p in plan if p.spec.name == "lm_head.weight")
    return layer, head


def projection(target, quant_config, measured_bytes, compute_s, overhead_s_per_call, machines=(2, 4)):
    """s/token of the target preset over K machines, scaled per weight byte from the measured pass."""
    from ..config import preset
    cfg = preset(target)
    layer, head = weight_bytes_per_token(cfg, quant_config)
    s_per_byte = compute_s / measured_bytes
    target_bytes = cfg.n_layers * layer + head
    return {"target": target, "target_layers": cfg.n_layers, "target_layer_bytes": layer,
            "target_head_bytes": head, "target_bytes_per_token": target_bytes,
            "measured_bytes_per_token": measured_bytes, "measured_s_per_gb": s_per_byte * 1e9,
            "overhead_s_per_stage_call": overhead_s_per_call,
            **{f"projected_s_per_token_{k}_machines": target_bytes * s_per_byte + k * overhead_s_per_call
               for k in machines}}


def run(path, stages, batch, passes, address, backend, max_memory, target):
    import ray

    import tinyllama_ref
    from .pipeline import PipelineModel
    local = tinyllama_ref.load(path, backend=backend, max_memory=max_memory)
    single, _ = decode_passes(local, batch, passes)
    cfg, quant_config = local.cfg, local.quant_config
    measured_bytes = sum(local.layers.file_bytes) + local.lm_head.nbytes
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
    moved = {"activations_bytes_per_hop": batch * cfg.dim * 4, "hops": stages - 1,
             "ids_bytes_in": batch * 8, "logits_bytes_out": batch * cfg.vocab_size * 4}
    out = {"checkpoint": path, "stages": stages, "layers_per_stage": layers, "batch": batch, "passes": passes,
           "single_process_s_per_pass": single, "pipeline_s_per_pass": piped,
           "stage_compute_s_per_call": compute, "pipeline_overhead_s_per_pass": overhead,
           "overhead_s_per_stage_call": overhead / stages, **moved}
    if target:
        out["projection"] = projection(target, quant_config, measured_bytes, sum(compute), overhead / stages)
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
    ap.add_argument("--target", default=None, metavar="PRESET",
                    help="project s/token for this model shape over 2 and 4 machines, e.g. llama2-70b")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.checkpoint, args.stages, args.batch, args.passes, args.address, args.backend,
                         args.max_memory, args.target), indent=1))


if __name__ == "__main__":
    main()
