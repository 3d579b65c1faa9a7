"""`perplexity` and `score`: evaluations by log-likelihood (see evaluate.py)."""

import json

import click

from .common import model_options, open_model
from ..errors import GenerationError
from ..progress import Progress


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--context", type=int, default=None, help="Window length in tokens (default: the model's).")
@click.option("--stride", type=int, default=None, help="Tokens between window starts (default: --context).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record.")
@model_options
def perplexity(checkpoint, file, context, stride, as_json, backend, max_memory, quiet,
               gptq_mode):
    """Perplexity of a text file, with a sliding window.

    \b
    Examples:
      tinyllama-ref perplexity ./ckpt notes.txt --context 512 --stride 256
      tinyllama-ref perplexity ./ckpt notes.txt --json
    """
    from ..evaluate import perplexity as run_perplexity
    try:
        text = open(file, encoding="utf-8").read()
    except FileNotFoundError:
        raise GenerationError(f"{file}: file not found") from None
    except UnicodeDecodeError:
        raise GenerationError(f"{file}: not UTF-8 text") from None
    model = open_model(checkpoint, backend, max_memory, quiet, gptq_mode)
    ids = model.tokenizer.encode(text, add_bos=True)
    bar = Progress("perplexity", len(ids), enabled=not quiet, unit="tok")
    result = run_perplexity(model, ids, context, stride, on_window=bar.update)
    bar.close()
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"perplexity {result['perplexity']:.4f} over {result['n_scored']} tokens "
                   f"({result['tokens_per_second']:.1f} tokens/s)")


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("items", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON record per item, then a summary record.")
@model_options
def score(checkpoint, items, as_json, backend, max_memory, quiet, gptq_mode):
    """Multiple-choice accuracy: each option scored by its log-likelihood after the question.

    ITEMS is JSONL, one {"question", "options", "answer"} per line (answer: the right option's index, text
    or letter; optional "context" for PubMedQA-style passages). Prints each item's choice by total
    log-likelihood (acc) and by log-likelihood per UTF-8 byte (acc_norm), then the accuracies.

    \b
    Example:
      tinyllama-ref score ./ckpt medqa_dev.jsonl --json
    """
    from ..evaluate import read_items, score as run_score
    parsed = read_items(items)
    model = open_model(checkpoint, backend, max_memory, quiet, gptq_mode)
    bar = Progress("scoring", len(parsed), enabled=not quiet, unit="items")
    summary = run_score(model, model.tokenizer, parsed, on_item=bar.update)
    bar.close()
    for i, r in enumerate(summary["results"], 1):
        if as_json:
            click.echo(json.dumps({"item": i, **r}))
        else:
            mark = "ok " if r["choice"] == r["answer"] else "no "
            click.echo(f"{mark}item {i}: chose {r['choice']} (norm {r['choice_norm']}), answer {r['answer']}")
    total = {"n_items": summary["n_items"], "accuracy": summary["accuracy"],
             "accuracy_norm": summary["accuracy_norm"]}
    click.echo(json.dumps(total) if as_json else
               f"accuracy {total['accuracy']:.4f}, length-normalised {total['accuracy_norm']:.4f} "
               f"over {total['n_items']} items")
