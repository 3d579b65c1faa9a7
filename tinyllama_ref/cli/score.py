"""`perplexity` and `score`: evaluations by log-likelihood (eval/loglik.py is the math, eval/runner.py the scheduling).

With -o both write their per-item results as they go (a JSONL file, one batch at a time, fsync'ed) and
--resume continues a run that was killed; see eval/results.py.
"""

import json
import os
import sys
import time

import click

from .common import model_options, notice, open_model
from .distributed import (open_model_or_pipeline, open_pool, pipeline_options, pool_model_view, pooled_iter_perplexity,
                          pooled_iter_score, ray_options)
from ..errors import GenerationError
from ..jsonl import read_text
from ..progress import Progress


def resumable_options(f):
    """-o / --resume / --batch-tokens, shared by the commands that write results as they go."""
    f = click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
                     help="Token rows per pass over the weights (default: from the memory budget; a resumed "
                          "run keeps the value it was started with).")(f)
    f = click.option("--resume", is_flag=True, help="Continue the -o file a killed run left, skipping what it "
                                                    "holds (refused if the checkpoint, settings or input differ).")(f)
    f = click.option("--output", "-o", type=click.Path(), default=None,
                     help="Write per-item JSONL results here as they are computed.")(f)
    return f


def prepare_output(output, resume):
    """Check -o before the model is loaded (so a typo does not cost a load), and read a partial file's
    batch size: (header of the partial file or None)."""
    from ..eval.results import check_writable, read_partial, ResumeError
    if resume and not output:
        raise GenerationError("--resume needs -o: the file to continue")
    if not output:
        return None
    check_writable(output)
    if os.path.exists(output) and not resume:
        raise ResumeError(f"{output} already exists: add --resume to continue it, or remove it to start over")
    if resume and os.path.exists(output):
        return read_partial(output)[0]
    return None


def batch_tokens_for(model, given, old_header):
    """--batch-tokens, else the partial file's (a resumed run must rebuild the same batches), else the plan's."""
    from ..eval.batching import default_batch_tokens
    if given:
        return given
    if old_header and isinstance(old_header.get("settings", {}).get("batch_tokens"), int):
        return old_header["settings"]["batch_tokens"]
    return getattr(model, "default_batch_tokens", None) or default_batch_tokens(model)   # a --ray pool's view


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--context", type=int, default=None, help="Window length in tokens (default: the model's).")
@click.option("--stride", type=int, default=None, help="Tokens between window starts (default: --context).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record.")
@resumable_options
@ray_options
@model_options
def perplexity(checkpoint, file, context, stride, as_json, output, resume, batch_tokens, backend, max_memory,
               quiet, gptq_mode, ray_address=None, workers=None, cpus_per_worker=1):
    """Perplexity of a text file, with a sliding window; windows are packed several to a pass.

    With -o, one JSONL record per window ({"window", "begin", "end", "n_scored", "nll"}) is written as
    the windows are done, and --resume continues a killed run.

    \b
    Examples:
      tinyllama-ref perplexity ./ckpt notes.txt --context 512 --stride 256
      tinyllama-ref perplexity ./ckpt notes.txt --json -o windows.jsonl --resume
    """
    from ..eval.results import ResultsWriter, make_header
    from ..eval.runner import iter_perplexity, perplexity_batch_starts, perplexity_from_records
    text = read_text(file, "text")
    old = prepare_output(output, resume)
    pool = open_pool(checkpoint, ray_address, workers, backend, max_memory, gptq_mode, cpus_per_worker, quiet)
    model = pool_model_view(checkpoint, pool) if pool else open_model(checkpoint, backend, max_memory, quiet, gptq_mode)
    if pool:                                     # the same batches, on the workers (distributed/tasks.py)
        iter_perplexity = pooled_iter_perplexity(pool)
    ids = model.tokenizer.encode(text, add_bos=True)
    batch_tokens = batch_tokens_for(model, batch_tokens, old)
    t0 = time.perf_counter()
    bar = Progress("perplexity", None, enabled=not quiet, unit="windows")
    on_batch = lambda done, total, rate: bar.update(done, total, note=f"{rate:.0f} tok/s")  # noqa: E731
    if output:
        settings = {"backend": backend, "gptq_mode": gptq_mode, "context": context or model.cfg.max_seq_len,
                    "stride": stride or context or model.cfg.max_seq_len, "batch_tokens": batch_tokens}
        starts = perplexity_batch_starts(model, ids, context, stride, batch_tokens)
        with ResultsWriter.open(output, make_header("perplexity", checkpoint, settings, file), resume,
                                boundaries=starts, number_key="window") as writer:
            skipped = writer.n_done
            for records in iter_perplexity(model, ids, context, stride, batch_tokens, skip=skipped,
                                           on_batch=on_batch):
                writer.append(records)
            records = writer.records
    else:
        skipped = 0
        records = [r for rs in iter_perplexity(model, ids, context, stride, batch_tokens, on_batch=on_batch)
                   for r in rs]
    bar.close()
    seconds = time.perf_counter() - t0
    processed = sum(r["end"] - r["begin"] for r in records[skipped:])
    result = {**perplexity_from_records(records, len(ids)), "seconds": seconds,
              "tokens_per_second": processed / seconds if seconds > 0 else float("inf"), "batch_tokens": batch_tokens}
    if output:
        notice(quiet, f"wrote {len(records)} window records to {output}"
                      + (f" ({skipped} were already there)" if skipped else ""))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"perplexity {result['perplexity']:.4f} over {result['n_scored']} tokens "
                   f"({result['tokens_per_second']:.1f} tokens/s)")


def score_prompts(parsed, num_fewshot, fewshot_file, seed, same=False):
    """Each item's prompt (few-shot demonstrations first), and the settings that made them."""
    from ..eval.fewshot import fewshot_prompts
    from ..eval.results import file_sha256
    from ..eval.items import read_items
    if num_fewshot and not fewshot_file:
        raise GenerationError("--num-fewshot needs --fewshot-file: the JSONL items the demonstrations come from")
    if num_fewshot < 0:
        raise GenerationError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    train = read_items(fewshot_file) if num_fewshot else []
    settings = {"num_fewshot": num_fewshot}
    if num_fewshot:
        settings.update(fewshot_sha256=file_sha256(fewshot_file), seed=seed, same_demonstrations=same)
    return fewshot_prompts(parsed, train, num_fewshot, seed, same), settings


def show_record(r, as_json):
    if as_json:
        click.echo(json.dumps(r))
    else:
        mark = "ok " if r["choice"] == r["answer"] else "no "
        click.echo(f"{mark}item {r['item']}: chose {r['choice']} (norm {r['choice_norm']}), answer {r['answer']}")
    sys.stdout.flush()


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("items", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON record per item, then a summary record.")
@click.option("--num-fewshot", type=int, default=0, show_default=True,
              help="Solved examples from --fewshot-file shown before each question.")
@click.option("--fewshot-file", type=click.Path(), default=None, help="JSONL items the demonstrations come from.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which demonstrations each item gets.")
@click.option("--same-demonstrations", is_flag=True,
              help="The same demonstrations for every item (their tokens then run once per batch).")
@click.option("--show-prompt", is_flag=True, help="Print the first item's prompt and options as scored, then stop.")
@click.option("--no-shared-prefix", is_flag=True, help="Run every option's whole sequence (for comparisons).")
@resumable_options
@ray_options
@pipeline_options
@model_options
def score(checkpoint, items, as_json, num_fewshot, fewshot_file, seed, same_demonstrations, show_prompt,
          no_shared_prefix, output, resume, batch_tokens, backend, max_memory, quiet, gptq_mode, ray_address=None,
          workers=None, cpus_per_worker=1, pipeline_address=None, stages=2, cpus_per_stage=1):
    """Multiple-choice accuracy: each option scored by its log-likelihood after the question.

    ITEMS is JSONL, one {"question", "options", "answer"} per line (answer: the right option's index, text
    or letter; optional "context" for PubMedQA-style passages). Prints each item's choice by total
    log-likelihood (acc) and by log-likelihood per character of the option (acc_norm, as the harness), then
    the accuracies.
    Options of one item share one run of the question; many items share each pass over the weights.

    With -o, one JSONL record per item, in input order, results only (timings go to the summary printed
    at the end), written a batch at a time; --resume continues a killed run to the same file an
    uninterrupted run writes.

    \b
    Examples:
      tinyllama-ref score ./ckpt medqa_dev.jsonl --json
      tinyllama-ref score ./ckpt medqa_test.jsonl --num-fewshot 3 --fewshot-file medqa_train.jsonl -o out.jsonl
      tinyllama-ref score ./ckpt medqa_test.jsonl -o out.jsonl --resume
    """
    from ..eval.results import ResultsWriter, make_header
    from ..eval.runner import batch_starts, iter_score
    from ..eval.items import read_items
    from ..eval.loglik import accuracy_summary
    parsed = read_items(items)
    prompts, prompt_settings = score_prompts(parsed, num_fewshot, fewshot_file, seed, same_demonstrations)
    if show_prompt:
        click.echo(prompts[0], nl=False)
        click.echo("\n--- scored continuations (each after the text above, leading space included):")
        for k, option in enumerate(parsed[0].options):
            mark = "*" if k == parsed[0].answer else " "
            click.echo(f"{mark} {json.dumps(' ' + option, ensure_ascii=False)}")
        return
    old = prepare_output(output, resume)
    if ray_address and pipeline_address:
        raise GenerationError("--ray and --pipeline do not go together: one spreads items, the other layers")
    pool = open_pool(checkpoint, ray_address, workers, backend, max_memory, gptq_mode, cpus_per_worker, quiet)
    model = pool_model_view(checkpoint, pool) if pool else open_model_or_pipeline(
        checkpoint, pipeline_address, stages, backend, max_memory, gptq_mode, cpus_per_stage, quiet)
    if pool:                                     # the same batches, on the workers (distributed/tasks.py)
        iter_score = pooled_iter_score(pool)
    tok = model.tokenizer
    batch_tokens = batch_tokens_for(model, batch_tokens, old)
    shared = not no_shared_prefix
    t0 = time.perf_counter()
    bar = Progress("scoring", len(parsed), enabled=not quiet, unit="items")
    on_batch = lambda done, total, rate: bar.update(done, total, note=f"{rate:.0f} tok/s")  # noqa: E731
    if output:
        settings = {"backend": backend, "gptq_mode": gptq_mode, "batch_tokens": batch_tokens,
                    "shared_prefix": shared, **prompt_settings}
        starts = batch_starts(model, tok, parsed, batch_tokens, prompts, shared)
        with ResultsWriter.open(output, make_header("score", checkpoint, settings, items), resume,
                                boundaries=starts) as writer:
            skipped = writer.n_done
            for records in iter_score(model, tok, parsed, batch_tokens, prompts, shared, skip=skipped,
                                      on_batch=on_batch):
                writer.append(records)
            records = writer.records
    else:                                        # to stdout, a batch at a time
        skipped, records = 0, []
        for batch in iter_score(model, tok, parsed, batch_tokens, prompts, shared, on_batch=on_batch):
            records += batch
            for r in batch:
                show_record(r, as_json)
    bar.close()
    seconds = time.perf_counter() - t0
    run_now = len(records) - skipped
    summary = {**accuracy_summary(records), "seconds": round(seconds, 3),
               "items_per_second": round(run_now / seconds, 4) if seconds > 0 else None,
               "items_resumed": skipped, "batch_tokens": batch_tokens}
    if output:
        notice(quiet, f"wrote {len(records)} item records to {output}"
                      + (f" ({skipped} were already there)" if skipped else ""))
    click.echo(json.dumps(summary) if as_json else
               f"accuracy {summary['accuracy']:.4f}, length-normalised {summary['accuracy_norm']:.4f} "
               f"over {summary['n_items']} items ({summary['items_per_second']} items/s)")
