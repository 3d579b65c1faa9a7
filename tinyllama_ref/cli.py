"""The `tinyllama-ref` command line.

Every command turns the project's own errors (bad files, bad arguments, too little memory) into one line on
stderr and a non-zero exit code; a traceback means a bug in tinyllama-ref, not in your input.
"""

import sys

import click

from .errors import TinyLlamaError


class Cli(click.Group):
    """A click group whose commands report TinyLlamaError as one line, exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TinyLlamaError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("error: out of memory; try a smaller --max-memory, batch or context", err=True)
            sys.exit(1)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tinyllama-ref")
def main():
    """A readable Llama-2 inference engine in NumPy and Numba (dense and GPTQ safetensors checkpoints).

    \b
    Examples:
      tinyllama-ref generate ./Meditron-70B-GPTQ --prompt-ids 1,306,4658 --max-new-tokens 8
      tinyllama-ref --help
    """


def parse_ids(text):
    """'1,306,4658' -> [1, 306, 4658]."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise click.BadParameter("no token ids given")
    return ids


def model_options(f):
    """Options shared by every command that runs a model."""
    f = click.option("--max-memory", default=None, metavar="SIZE",
                     help="Memory budget, e.g. 20GB, 1500MB or bytes (default: from available memory).")(f)
    f = click.option("--backend", type=click.Choice(["numba", "numpy"]), default="numba", show_default=True,
                     help="numba: fast kernels; numpy: the readable reference.")(f)
    return f


def open_model(checkpoint, backend, max_memory, quiet=True):
    from . import load
    return load(checkpoint, backend=backend, max_memory=max_memory, quiet=quiet)


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt-ids", required=True, help="Prompt as comma-separated token ids, e.g. 1,306,4658.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--ignore-eos", is_flag=True, help="Keep going past the end-of-sequence token.")
@model_options
def generate(checkpoint, prompt_ids, max_new_tokens, temperature, seed, ignore_eos, backend, max_memory):
    """Continue a prompt and print the new token ids.

    \b
    Example:
      tinyllama-ref generate ./tiny-llama --prompt-ids 1,306,4658 --max-new-tokens 8
    """
    ids = parse_ids(prompt_ids)
    model = open_model(checkpoint, backend, max_memory)
    out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                         stop_ids=[] if ignore_eos else None)
    click.echo(",".join(str(i) for i in out))


if __name__ == "__main__":
    main()
