"""`tinyllama-ref synth`: write a synthetic checkpoint (see synth.py for what is written and why).

The command is a standalone click.Command so the main CLI only needs `main.add_command(synth)`. It turns the
project's errors into one `error: ...` line itself, so it behaves the same when run on its own (tests).
"""

import sys

import click

from ..config import PRESETS
from ..errors import TinyLlamaError
from .gptq_flags import gptq_settings


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
              help="Model shape (Llama-2 sizes; llama2-70b has Meditron-70B's 32017-row embedding).")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="Override the preset's number of layers (e.g. a 1-layer 70B for tests and benchmarks).")
@gptq_settings
@click.option("--dense", type=click.Choice(["fp16", "bf16"]), default=None,
              help="Write a plain (unquantized) Hugging Face checkpoint in this dtype instead of GPTQ.")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of safetensors files; more than 1 also writes model.safetensors.index.json.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same tensors).")
@click.option("--exist-ok", is_flag=True,
              help="If OUT already holds a checkpoint with the config.json these settings write, keep it and "
                   "exit 0 (a set-up script can run twice); otherwise OUT must be new or empty.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line on stderr.")
def synth(out, preset, layers, bits, group_size, act_order, sym, checkpoint_format, dense, shards, seed, exist_ok,
          quiet):
    """Write a synthetic checkpoint to OUT (a new or empty directory).

    Random but well-behaved weights (finite activations over 80 layers) in the exact layout of TheBloke's
    GPTQ files: model.safetensors (or shards), config.json with quantization_config, quantize_config.json,
    generation_config.json, and a SentencePiece tokenizer.model trained on generated text with Meditron-style
    added tokens whose ids lie past the embedding. Tensors are written one at a time, so memory stays small;
    free disk space is checked first.

    \b
    Examples:
      tinyllama-ref synth ./tiny-gptq                                   # 2.5 MB, 4-bit g128 act-order
      tinyllama-ref synth ./tiny-gptq --exist-ok                        # again: keeps the one it made
      tinyllama-ref synth ./m70b --preset llama2-70b --bits 4 --group-size 128 --act-order   # 36.7 GB, ~5 min
      tinyllama-ref synth ./m70b-main --preset llama2-70b --bits 4 --group-size -1          # Meditron main
      tinyllama-ref synth ./m70b-1layer --preset llama2-70b --layers 1 --bits 3 --group-size 32
      tinyllama-ref synth ./l7b-fp16 --preset llama2-7b --dense fp16 --shards 2
    """
    from ..make.synth import synthesize
    from ..memory import human
    try:
        summary = synthesize(out, preset=preset, bits=int(bits), group_size=group_size, act_order=act_order,
                             sym=sym, dense_dtype=dense, shards=shards, seed=seed,
                             checkpoint_format=checkpoint_format, layers=layers, quiet=quiet, exist_ok=exist_ok)
    except TinyLlamaError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if summary["kept"]:
        click.echo(f"kept {summary['out_dir']}: it already holds this checkpoint (--exist-ok)")
        return
    click.echo(f"wrote {summary['out_dir']}: {summary['format']}, preset {preset}, {summary['n_layers']} layers, "
               f"{human(summary['safetensors_bytes'])} of tensors in {summary['write_seconds']:.1f} s "
               f"(tokenizer {summary['tokenizer_seconds']:.1f} s)")
    click.echo("files: " + ", ".join(summary["files"]))
