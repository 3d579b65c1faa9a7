"""The numerics commands: `tinyllama-ref verify` and `tinyllama-ref quantize`.

Both are plain click.Command objects; cli.py attaches them to the `tinyllama-ref` group, whose error handling
turns any TinyLlamaError into one line on stderr and exit code 1.
"""

import sys

import click

from .errors import TinyLlamaError


def prompt_token_ids(checkpoint, prompt, prompt_ids):
    """The ids to run: --prompt-ids as given, or --prompt through the checkpoint's tokenizer (BOS first)."""
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --prompt-ids 1,306,4658")
    if prompt_ids is not None:
        from .cli import parse_ids
        return parse_ids(prompt_ids)
    from .tokenizer import Tokenizer
    return Tokenizer.from_dir(checkpoint).encode(prompt, add_bos=True)


@click.command("verify")
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt", default=None, help="Prompt text (needs tokenizer.model in the checkpoint).")
@click.option("--prompt-ids", default=None, help="Prompt as comma-separated token ids, e.g. 1,306,4658.")
@click.option("--backend", type=click.Choice(["numba", "numpy"]), default="numpy", show_default=True,
              help="Which of our backends to check against transformers.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory budget for OUR model, e.g. 20GB (transformers' side holds one float32 layer).")
@click.option("--rtol", type=float, default=None,
              help="Relative tolerance for hidden states and logits (default 1e-4).")
def verify(checkpoint, prompt, prompt_ids, backend, max_memory, rtol):
    """Compare every layer's hidden state and the logits with transformers on the same weights.

    Needs the optional extra: pip install 'tinyllama-ref[verify]'. GPTQ weights are dequantized by our
    reference into a float32 transformers layer; one transformers layer exists at a time, so a 70B
    checkpoint works within the memory budget. Exits with code 1 when a layer or the logits fall outside
    the tolerance, naming the first layer that diverges.

    \b
    Example:
      tinyllama-ref verify ./Meditron-70B-GPTQ --prompt "The patient presents with" --max-memory 20GB
    """
    from .verify import Tolerance, compare, format_report
    ids = prompt_token_ids(checkpoint, prompt, prompt_ids)
    tol = Tolerance() if rtol is None else Tolerance(hidden_rel=rtol, logits_rel=rtol)
    report = compare(checkpoint, ids, backend=backend, max_memory=max_memory, tolerance=tol)
    click.echo(format_report(report))
    if not report.passed:
        sys.exit(1)


__all__ = ["verify", "TinyLlamaError"]
