"""The `tinyllama-ref` command line. Every click command lives in this package, and nothing outside it
imports click.

    main.py      the group (one-line errors, exit 1), generate, chat, inspect
    score.py     perplexity, score
    synth.py     synth: random checkpoints of any Llama-2 shape
    numerics.py  verify (against transformers), quantize (GPTQ)
    bench.py     bench kernels, bench generate
    serve.py     serve: the HTTP server (extra [serve])
    common.py    the options and helpers the commands share
"""

from .bench import bench
from .score import perplexity, score
from .main import Cli, main
from .lm_eval import lm_eval_command
from .numerics import quantize, verify
from .serve import serve
from .synth import synth

for _command in (perplexity, score, lm_eval_command, synth, verify, quantize, bench, serve):
    main.add_command(_command)

__all__ = ["main", "Cli"]
