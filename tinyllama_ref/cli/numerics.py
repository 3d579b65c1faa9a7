"""The numerics commands: `tinyllama-ref verify` and `tinyllama-ref quantize`.

Both are plain click.Command objects; cli.py attaches them to the `tinyllama-ref` group, whose error handling
turns any TinyLlamaError into one line on stderr and exit code 1.
"""

import math
import os
import sys

import click

from .gptq_flags import gptq_settings
from ..errors import TinyLlamaError



def prompt_token_ids(checkpoint, prompt, prompt_ids):
    """The ids to run: --prompt-ids as given, or --prompt through the checkpoint's tokenizer (BOS first)."""
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --prompt-ids 1,306,4658")
    if prompt_ids is not None:
        from .common import parse_ids
        return parse_ids(prompt_ids)
    from ..tokenizer import Tokenizer
    return Tokenizer.from_dir(checkpoint).encode(prompt, add_bos=True)


def check_output_dir(out):
    """OUT must be a directory to be (or an empty one): refuse a file there, or under a file, at once."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise TinyLlamaError(f"{out}: exists and is not a directory; choose a new output directory")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise TinyLlamaError(f"{out}: cannot be created, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TinyLlamaError(f"{out}: cannot be created, {parent} is not writable")


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
@click.option("--quiet", "-q", is_flag=True, help="No per-layer progress on stderr.")
def verify(checkpoint, prompt, prompt_ids, backend, max_memory, rtol, quiet):
    """Compare every layer's hidden state and the logits with transformers on the same weights.

    Needs the optional extra: pip install -e '.[verify]' in the tinyllama-ref source directory. GPTQ
    weights are dequantized by our reference into a float32 transformers layer; one transformers layer
    exists at a time, so a 70B checkpoint works within the memory budget. Exits with code 1 when a layer or
    the logits fall outside the tolerance, naming the first layer that diverges.

    \b
    Example:
      tinyllama-ref verify ./Meditron-70B-GPTQ --prompt "The patient presents with" --max-memory 20GB
    """
    from ..measure.verify import Tolerance, compare, format_report
    if rtol is not None and not (math.isfinite(rtol) and rtol >= 0):
        raise TinyLlamaError(f"--rtol must be a finite number >= 0 (a relative tolerance such as 1e-4), "
                             f"got {rtol}")
    ids = prompt_token_ids(checkpoint, prompt, prompt_ids)
    tol = Tolerance() if rtol is None else Tolerance(hidden_rel=rtol, logits_rel=rtol)

    def progress(row, n_layers):
        click.echo(f"layer {row.index + 1}/{n_layers}: rel diff {row.rel:.2e}, same input {row.local_rel:.2e}",
                   err=True)
    report = compare(checkpoint, ids, backend=backend, max_memory=max_memory, tolerance=tol,
                     on_layer=None if quiet else progress)
    click.echo(format_report(report))
    if not report.passed:
        sys.exit(1)


@click.command("quantize")
@click.argument("dense_checkpoint", type=click.Path())
@click.argument("out", type=click.Path())
@gptq_settings
@click.option("--damp-percent", type=float, default=0.01, show_default=True,
              help="Dampening added to the Hessian's diagonal, as a fraction of its mean.")
@click.option("--calibration", "calibration_text", type=click.Path(), default=None,
              help="Calibration text file (tokenized with the checkpoint's tokenizer).")
@click.option("--calibration-ids", type=click.Path(), default=None,
              help="Calibration token ids: a JSON list (of lists) or one comma-separated sequence per line.")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per calibration sequence.")
@click.option("--n-samples", type=int, default=128, show_default=True, help="Calibration sequences used.")
@click.option("--quiet", "-q", is_flag=True, help="No per-layer progress on stderr.")
def quantize(dense_checkpoint, out, bits, group_size, act_order, sym, checkpoint_format, damp_percent,
             calibration_text, calibration_ids, seq_len, n_samples, quiet):
    """Quantize a dense checkpoint with GPTQ (NumPy) into an AutoGPTQ-layout checkpoint directory.

    Layer by layer: the calibration activations pass through one dense layer at a time, each linear is
    quantized with Cholesky-based error feedback on the inputs it will really see (true sequential), and the
    packed tensors are appended to OUT/model.safetensors before the next layer is read. OUT must be new or
    empty, or hold only the model.safetensors.partial of an interrupted run, which the same command resumes.

    \b
    Example:
      tinyllama-ref quantize ./llama-dense ./llama-gptq --bits 4 --group-size 128 --act-order \\
          --calibration notes.txt
    """
    from ..make.quantize import calibration_from_text, quantize_checkpoint, read_calibration_ids
    if (calibration_text is None) == (calibration_ids is None):
        raise click.UsageError("give exactly one of --calibration TEXT_FILE or --calibration-ids IDS_FILE")
    if seq_len < 2 or n_samples < 1:
        raise click.BadParameter("--seq-len must be >= 2 and --n-samples >= 1")
    check_output_dir(out)                    # before calibration, which may take a while
    if calibration_ids is not None:
        seqs = read_calibration_ids(calibration_ids)
    else:
        seqs = calibration_from_text(calibration_text, dense_checkpoint, seq_len, n_samples)
    errors = quantize_checkpoint(dense_checkpoint, out, seqs, bits=int(bits), group_size=group_size,
                                 act_order=act_order, sym=sym, damp_percent=damp_percent,
                                 checkpoint_format=checkpoint_format, seq_len=seq_len, n_samples=n_samples,
                                 quiet=quiet)
    worst = max((max(e.values()) for e in errors.values()), default=None)     # None: every layer was resumed
    click.echo(f"wrote {out} ({bits}-bit, group size {group_size}, act-order {'on' if act_order else 'off'}, "
               f"{'sym' if sym else 'asym'}); worst relative output error of a linear on the calibration "
               + (f"inputs: {worst:.3e}" if worst is not None else "inputs: see the interrupted run's log"))


__all__ = ["verify", "quantize"]
