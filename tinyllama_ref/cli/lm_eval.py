"""`lm-eval`: lm-evaluation-harness tasks run on a tinyllama-ref checkpoint (eval/harness.py's TinyLlamaLM).

Needs the optional extra: pip install -e '.[eval]' in the tinyllama-ref source directory.
"""

import json
import os

import click

from .common import model_options, notice
from ..errors import GenerationError


@click.command("lm-eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--tasks", required=True, help="Comma-separated task names, e.g. medqa_4options,pubmedqa.")
@click.option("--include-path", type=click.Path(), default=None,
              help="A directory of your own task YAMLs (e.g. the harness's, pointed at local data).")
@click.option("--num-fewshot", type=int, default=None, help="Demonstrations per question (default: the task's).")
@click.option("--limit", type=float, default=None, help="Only the first N documents of each task (< 1: a fraction).")
@click.option("--seed", type=int, default=1234, show_default=True, help="The harness's few-shot sampling seed.")
@click.option("--max-length", type=int, default=None, help="Context in tokens (default: the model's).")
@click.option("--output", "-o", type=click.Path(), default=None,
              help="Write the results dict simple_evaluate returns here (JSON); every answer also goes to "
                   "OUTPUT.requests.jsonl as it is computed.")
@click.option("--resume", is_flag=True, help="Reuse the answers in OUTPUT.requests.jsonl a killed run left.")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
              help="Token rows per pass over the weights (default: from the memory budget).")
@model_options
def lm_eval_command(checkpoint, tasks, include_path, num_fewshot, limit, seed, max_length, output, resume,
                    batch_tokens, backend, max_memory, quiet, gptq_mode):
    """Run lm-evaluation-harness tasks with this engine as the model.

    \b
    Examples:
      tinyllama-ref lm-eval ./ckpt --tasks pubmedqa --include-path my_tasks/ --num-fewshot 3 -o results.json
      tinyllama-ref lm-eval ./ckpt --tasks medqa_4options --limit 50 -o r.json --resume
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError:
        raise GenerationError("lm-eval needs lm-evaluation-harness: pip install -e '.[eval]' in the "
                              "tinyllama-ref source directory") from None
    from ..eval.batching import describe
    from ..eval.harness import TinyLlamaLM
    from ..eval.results import ResumeError, check_writable
    from ..progress import Progress
    if resume and not output:
        raise GenerationError("--resume needs -o: its OUTPUT.requests.jsonl holds the answers to reuse")
    if output:
        check_writable(output)
        if os.path.exists(f"{output}.requests.jsonl") and not resume:       # before the slow task index
            raise ResumeError(f"{output}.requests.jsonl already exists: add --resume to continue it, or remove "
                              "it to start over")
    if include_path and not os.path.isdir(include_path):
        raise GenerationError(f"--include-path {include_path}: not a directory")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise GenerationError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not among the "
                              f"harness's tasks{' or those in ' + include_path if include_path else ''}")
    lm = TinyLlamaLM(checkpoint, backend=backend, max_memory=max_memory, gptq_mode=gptq_mode,
                     batch_tokens=batch_tokens, max_length=max_length,
                     log_path=f"{output}.requests.jsonl" if output else None, resume=resume, quiet=quiet)
    if lm.log and lm.log.values:
        notice(quiet, f"resuming: {len(lm.log.values)} answers already in {lm.log.path}")
    notice(quiet, describe(lm.tl_model, lm.batch_tokens))
    bars, done = {}, {}

    def progress(kind, n, total):
        bar = bars.setdefault(kind, Progress(kind, total, enabled=not quiet, unit="requests"))
        done[kind] = done.get(kind, 0) + n
        bar.update(done[kind], total)
        if done[kind] >= total:
            bar.close()
            del bars[kind], done[kind]
    lm.on_progress = progress
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, random_seed=seed,
                                      fewshot_random_seed=seed)
    if lm.log:
        lm.log.close()
    if output:
        tmp = f"{output}.partial-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        os.replace(tmp, output)
        notice(quiet, f"wrote {output}")
    click.echo(make_table(results))
