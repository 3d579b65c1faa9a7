"""The command-line side of tinyllama_ref.distributed: the --ray/--workers and --pipeline/--stages options,
and turning them into a worker pool or a pipelined model (see docs/distributed.md).

    tinyllama-ref score ./ckpt items.jsonl --ray auto --workers 4 -o out.jsonl
    tinyllama-ref generate ./ckpt --prompt "Gout is" --pipeline auto --stages 2
"""

import time
from types import SimpleNamespace

import click

from ..errors import TinyLlamaError
from .common import notice, open_model


def ray_options(f):
    """--ray / --workers / --cpus-per-worker: run the items on a pool of Ray workers, each with the model."""
    f = click.option("--cpus-per-worker", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Cores each worker reserves and computes on (a node's core count: one worker per "
                          "node).")(f)
    f = click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Ray workers, each loading the checkpoint (same path on every node) under its own "
                          "--max-memory (default with --ray: 2).")(f)
    f = click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
                     help="Spread the items over Ray workers: auto (this machine's `ray start` cluster, else a "
                          "private one), local (always a private one) or the head's HOST:6379.")(f)
    return f


def pipeline_options(f):
    """--pipeline / --stages / --cpus-per-stage: hold the layers on K Ray actors instead of in this process."""
    f = click.option("--cpus-per-stage", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Cores each stage reserves and computes on (a node's core count: one stage per node).")(f)
    f = click.option("--stages", type=click.IntRange(min=1), default=2, show_default=True,
                     help="Pipeline stages: contiguous ranges of layers, each resident on its own actor.")(f)
    f = click.option("--pipeline", "pipeline_address", default=None, metavar="auto|ADDRESS",
                     help="Split the model's layers over Ray actors (one per node, each within its own "
                          "--max-memory): auto, local or the head's HOST:6379.")(f)
    return f


def open_pool(checkpoint, ray_address, workers, backend, max_memory, gptq_mode, cpus_per_worker, quiet):
    """A DataParallel pool for --ray, or None without it."""
    if ray_address is None:
        if workers is not None:
            raise TinyLlamaError("--workers goes with --ray (auto or the cluster's address)")
        return None
    from ..distributed.runner import DataParallel
    t = time.perf_counter()
    pool = DataParallel(checkpoint, workers=workers or 2, backend=backend, max_memory=max_memory,
                        gptq_mode=gptq_mode, address=ray_address, cpus_per_worker=cpus_per_worker)
    hosts = sorted({h for h, _ in pool.hosts})
    notice(quiet, f"{len(pool.actors)} Ray workers ready on {', '.join(hosts)} ({time.perf_counter() - t:.1f} s)")
    return pool


def pool_model_view(checkpoint, pool):
    """What the commands read of a model when the pool's workers hold the weights: the config, the
    tokenizer, the path, and the batch size every worker's budget allows (the smallest of their defaults)."""
    from ..checkpoint import Checkpoint
    from ..config import load_config, with_vocab
    from ..eval.batching import default_batch_tokens
    from ..tokenizer import Tokenizer
    from ..weights import embedding_info
    cfg = load_config(checkpoint)
    cfg = with_vocab(cfg, embedding_info(Checkpoint(checkpoint), cfg.dim).shape[0])
    view = SimpleNamespace(cfg=cfg, path=checkpoint, load_seconds=0.0,
                           default_batch_tokens=min(pool.call(default_batch_tokens)))
    view.tokenizer = Tokenizer.from_dir(checkpoint, vocab_size=cfg.vocab_size)
    return view


def open_model_or_pipeline(checkpoint, pipeline_address, stages, backend, max_memory, gptq_mode, cpus_per_stage,
                           quiet):
    """The model in this process (common.open_model), or with --pipeline a TextModel over K stage actors."""
    if pipeline_address is None:
        return open_model(checkpoint, backend, max_memory, quiet, gptq_mode)
    from .. import TextModel
    from ..distributed.pipeline import PipelineModel
    t = time.perf_counter()
    model = TextModel(PipelineModel(checkpoint, stages=stages, backend=backend, max_memory=max_memory,
                                    gptq_mode=gptq_mode, address=pipeline_address, cpus_per_stage=cpus_per_stage))
    model.model.load_seconds = time.perf_counter() - t
    notice(quiet, model.layers.describe())
    return model
