"""The GPTQ settings as command-line flags, declared once for the two commands that write GPTQ files
(`synth` and `quantize`), so the same setting has the same name, default and meaning in both."""

import click

from ..quant import CHECKPOINT_FORMATS, SUPPORTED_BITS


def gptq_settings(command):
    """Add --bits, --group-size, --act-order/--no-act-order, --sym/--asym, --checkpoint-format to a command."""
    flags = [
        click.option("--bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default="4",
                     show_default=True, help="Bits per weight."),
        click.option("--group-size", type=int, default=128, show_default=True,
                     help="Inputs per scale/zero group; -1 means one group over all inputs."),
        click.option("--act-order/--no-act-order", default=True, show_default=True,
                     help="desc_act: inputs quantized by decreasing Hessian diagonal, so g_idx is a "
                          "non-monotonic group map (TheBloke's act-order files)."),
        click.option("--sym/--asym", default=True, show_default=True,
                     help="Symmetric grid (every zero point 2**(bits-1)) or asymmetric (min-max: zeros vary by "
                          "group and column)."),
        click.option("--checkpoint-format", type=click.Choice(list(CHECKPOINT_FORMATS)), default="gptq",
                     show_default=True, help="gptq: AutoGPTQ v1 (stored zero = zero - 1), what most files use; "
                                             "gptq_v2: GPTQModel (stored zero = zero)."),
    ]
    for flag in reversed(flags):          # click applies decorators bottom-up; keep the list's order in --help
        command = flag(command)
    return command
