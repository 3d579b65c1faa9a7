"""`bench kernels` and `bench generate`: the benchmarks in tools/, reachable from the installed command.

Arguments are passed through to the benchmark's own parser (`tinyllama-ref bench generate --help`).
"""

import click

PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


@click.group()
def bench():
    """Benchmarks: GPTQ kernels against memory bandwidth, generation against the I/O bound.

    \b
    Examples:
      tinyllama-ref bench kernels --json
      tinyllama-ref bench generate ./ckpt                      # pp64, pp512, tg16 (see --help)
      tinyllama-ref bench generate ./ckpt --gptq-mode int8 --fresh --cold --json
      tinyllama-ref bench generate ./ckpt --batch 1,8,32 --max-memory 20GB --json
      tinyllama-ref bench int8-accuracy ./ckpt --tokens 64,512 --json
      tinyllama-ref bench prefill-profile ./ckpt --tokens 64,512
    """


@bench.command(context_settings=PASS_THROUGH, add_help_option=False)
@click.pass_context
def kernels(ctx):
    """GPTQ GEMV/prefill kernels on the 70B layer shapes (see tinyllama_ref/measure/bench_kernels.py)."""
    from ..measure.bench_kernels import main
    main(ctx.args)


@bench.command(context_settings=PASS_THROUGH, add_help_option=False)
@click.pass_context
def generate(ctx):
    """pp64/pp512/tg16 rows like llama-bench (--batch 1,8,32: batched decode against the I/O bound)."""
    from ..measure.bench_generate import main
    main(ctx.args)


@bench.command("eval", context_settings=PASS_THROUGH, add_help_option=False)
@click.pass_context
def eval_(ctx):
    """Multiple-choice scoring items/s: one at a time, shared prefix, packed, both (eval/bench.py)."""
    from ..eval.bench import main
    main(ctx.args)


@bench.command("prefill-profile", context_settings=PASS_THROUGH, add_help_option=False)
@click.pass_context
def prefill_profile(ctx):
    """Where a 64- and 512-token prefill spends its time, step by step (measure/prefill_profile.py)."""
    from ..measure.prefill_profile import main
    main(ctx.args)


@bench.command("int8-accuracy", context_settings=PASS_THROUGH, add_help_option=False)
@click.pass_context
def int8_accuracy(ctx):
    """What --gptq-mode int8 costs: per-layer error, KL, top-1, perplexity (measure/int8_accuracy.py)."""
    from ..measure.int8_accuracy import main
    main(ctx.args)
