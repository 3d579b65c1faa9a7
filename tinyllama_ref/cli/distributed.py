"""The command-line side of tinyllama_ref.distributed: the --ray/--workers and --pipeline/--stages options,
and turning them into a worker pool or a pipelined model (see docs/distributed.md).

    tinyllama-ref score ./ckpt items.jsonl --ray auto --workers 4 -o out.jsonl
    tinyllama-ref generate ./ckpt --prompt "Gout is" --pipeline auto --stages 2
"""

import time
from types import SimpleNamespace

import click

from ..errors import TinyLlamaError
from .common import cli_threads, notice, open_model


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
                        gptq_mode=gptq_mode, address=ray_address, cpus_per_worker=cpus_per_worker,
                        threads=cli_threads())
    click.get_current_context().call_on_close(pool.close)         # the workers' memory back when the command ends
    hosts = sorted({h for h, _ in pool.hosts})
    notice(quiet, f"{len(pool.actors)} Ray workers ready on {', '.join(hosts)} ({time.perf_counter() - t:.1f} s)")
    return pool


def pool_model_view(checkpoint, pool):
    """What the commands read of a model when the pool's workers hold the weights: a TextModel (tokenizer,
    encode_prompt) over the config and path only, with `pool` and the batch size every worker's budget
    allows (the smallest of their defaults)."""
    from .. import TextModel
    from ..checkpoint import Checkpoint
    from ..config import load_config, with_vocab
    from ..eval.batching import default_batch_tokens
    from ..weights import embedding_info
    cfg = load_config(checkpoint)
    cfg = with_vocab(cfg, embedding_info(Checkpoint(checkpoint), cfg.dim).shape[0])
    return TextModel(SimpleNamespace(cfg=cfg, path=checkpoint, load_seconds=0.0, pool=pool,
                                     default_batch_tokens=min(pool.call(default_batch_tokens))))


def in_batches(records, starts, skip, on_batch, total, rows=None):
    """Records one at a time -> the lists a single process yields, one per batch (boundaries `starts`);
    on_batch(done, total, token rows per second) after each, as eval.runner calls it."""
    t0, done_rows = time.perf_counter(), 0
    bounds = [s for s in starts if s >= skip]
    for a, b in zip(bounds[:-1], bounds[1:]):
        batch = [next(records) for _ in range(b - a)]
        done_rows += sum(rows[a:b]) if rows else b - a
        if on_batch:
            on_batch(b, total, done_rows / max(time.perf_counter() - t0, 1e-9))
        yield batch


def pooled_iter_score(pool):
    """eval.runner.iter_score, run on the pool (same arguments, same per-batch lists of records)."""
    def iter_score(model, tokenizer, items, batch_tokens, prompts=None, shared_prefix=True, skip=0, on_batch=None):
        from ..distributed.tasks import iter_score as pool_score
        from ..eval.runner import batch_starts, plan_items
        starts = batch_starts(model, tokenizer, items, batch_tokens, prompts, shared_prefix)
        groups, owners, _ = plan_items(model, tokenizer, items, batch_tokens, prompts, shared_prefix)
        rows = [sum(groups[g].rows() for g in own) for own in owners]
        records = pool_score(pool, model.cfg, tokenizer, items, batch_tokens, prompts, shared_prefix, skip=skip)
        return in_batches(records, starts, skip, on_batch, len(items), rows)
    return iter_score


def pooled_iter_perplexity(pool):
    """eval.runner.iter_perplexity, run on the pool."""
    def iter_perplexity(model, ids, context=None, stride=None, batch_tokens=None, skip=0, on_batch=None):
        from ..distributed.tasks import iter_perplexity_records
        from ..eval.runner import perplexity_batch_starts
        from ..eval.loglik import check_perplexity_args, perplexity_windows
        starts = perplexity_batch_starts(model, ids, context, stride, batch_tokens)
        rows = [e - b for b, _, e in perplexity_windows(len(ids), *check_perplexity_args(model, len(ids), context,
                                                                                          stride))]
        records = iter_perplexity_records(pool, model.cfg, ids, context, stride, batch_tokens, skip=skip)
        return in_batches(records, starts, skip, on_batch, starts[-1], rows)
    return iter_perplexity


def pooled_iter_generate(pool):
    """eval.prompts.iter_generate, run on the pool (the Completions come back; records are made here)."""
    def iter_generate(model, tokenizer, prompts, max_new_tokens, params, stop_strings, stop_ids, batch_tokens,
                      skip=0, make_record=None):
        from ..distributed.tasks import iter_generate_completions
        from ..eval.prompts import batch_starts
        starts = batch_starts(prompts, max_new_tokens, batch_tokens)
        done = iter_generate_completions(pool, prompts, max_new_tokens, params, stop_strings, stop_ids,
                                         batch_tokens, skip=skip)
        records = (make_record(i, c) for i, c in done)
        return in_batches(records, starts, skip, None, len(prompts))
    return iter_generate


def open_model_or_pipeline(checkpoint, pipeline_address, stages, backend, max_memory, gptq_mode, cpus_per_stage,
                           quiet):
    """The model in this process (common.open_model), or with --pipeline a TextModel over K stage actors."""
    if pipeline_address is None:
        return open_model(checkpoint, backend, max_memory, quiet, gptq_mode)
    from .. import TextModel
    from ..distributed.pipeline import PipelineModel
    t = time.perf_counter()
    model = TextModel(PipelineModel(checkpoint, stages=stages, backend=backend, max_memory=max_memory,
                                    gptq_mode=gptq_mode, address=pipeline_address, cpus_per_stage=cpus_per_stage,
                                    threads=cli_threads()))
    click.get_current_context().call_on_close(model.model.close)
    model.model.load_seconds = time.perf_counter() - t
    notice(quiet, model.layers.describe())
    return model
