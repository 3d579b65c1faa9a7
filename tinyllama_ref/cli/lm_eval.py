"""`lm-eval`: lm-evaluation-harness's own command line, with this checkpoint as the model.

    tinyllama-ref lm-eval CKPT [our options] [lm-eval's options]
      = lm_eval run --model tinyllama-ref --model_args pretrained=CKPT,<our options> [lm-eval's options]

Our options are the few that are about the model (the backend, memory budget, GPTQ mode, batch size, context,
chat template) and our resumable answer log (-o/--resume); every other option goes to lm-eval's own argument
parser as it is (--tasks, --num_fewshot, --limit, --log_samples, --output_path, --apply_chat_template,
--system_instruction, --fewshot_as_multiturn, --gen_kwargs, --include_path, --seed, ...), so whatever the
installed lm-eval offers works here too. Options may be spelled with "-" or "_" (--include-path).

Needs the optional extra: pip install -e '.[eval]' in the tinyllama-ref source directory.
"""

import json
import os
import sys

import click

from .common import model_options, notice
from ..errors import GenerationError
from ..templates import TEMPLATES

MODEL_NAME = "tinyllama-ref"


@click.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True})
@click.argument("checkpoint", type=click.Path())
@click.option("--max-length", type=int, default=None, help="Context in tokens (default: the model's).")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
              help="Token rows per pass over the weights (default: from the memory budget).")
@click.option("--template", type=click.Choice(["auto", *TEMPLATES]), default="auto", show_default=True,
              help="The chat template --apply_chat_template uses (auto: the checkpoint's own, else a built-in).")
@click.option("--output", "-o", type=click.Path(), default=None,
              help="Write the results dict simple_evaluate returns here (JSON); every answer also goes to "
                   "OUTPUT.requests.jsonl as it is computed. (lm-eval's own results folder: --output_path.)")
@click.option("--resume", is_flag=True, help="Reuse the answers in OUTPUT.requests.jsonl a killed run left.")
@model_options
@click.argument("harness_args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_command(checkpoint, max_length, batch_tokens, template, output, resume, backend, max_memory, quiet,
                    gptq_mode, harness_args):
    """Run lm-evaluation-harness with this checkpoint as the model; lm-eval's options pass through
    (`lm_eval run -h` lists them).

    \b
    Examples:
      tinyllama-ref lm-eval ./ckpt --tasks pubmedqa --include_path my_tasks/ --num_fewshot 3 -o results.json
      tinyllama-ref lm-eval ./ckpt --tasks medqa_4options --limit 50 --log_samples --output_path out/
      tinyllama-ref lm-eval ./ckpt --tasks gsm8k --apply_chat_template --fewshot_as_multiturn \\
          --system_instruction "Answer briefly." --gen_kwargs temperature=0
      tinyllama-ref lm-eval ./ckpt --tasks medqa_4options -o r.json --resume
    """
    try:
        import lm_eval
        from lm_eval.__main__ import cli_evaluate
        from lm_eval.utils import handle_non_serializable
    except ImportError:
        raise GenerationError("lm-eval needs lm-evaluation-harness: pip install -e '.[eval]' in the "
                              "tinyllama-ref source directory") from None
    from ..eval.harness import TinyLlamaLM  # noqa: F401  (registers the model name)
    from ..eval.results import ResumeError, check_writable
    if resume and not output:
        raise GenerationError("--resume needs -o: its OUTPUT.requests.jsonl holds the answers to reuse")
    if output:
        check_writable(output)
        if os.path.exists(f"{output}.requests.jsonl") and not resume:       # before the slow task index
            raise ResumeError(f"{output}.requests.jsonl already exists: add --resume to continue it, or remove "
                              "it to start over")
    ours = {"pretrained": checkpoint, "backend": backend, "max_memory": max_memory, "gptq_mode": gptq_mode,
            "batch_tokens": batch_tokens, "max_length": max_length, "template": template, "quiet": quiet,
            "log_path": f"{output}.requests.jsonl" if output else None, "resume": resume}
    for key, value in ours.items():
        if isinstance(value, str) and ("," in value or value != value.strip()):
            raise GenerationError(f"{key} {value!r}: lm-eval's --model_args cannot carry a comma or edge spaces; "
                                  "rename or link it")
    model_args = ",".join(f"{k}={v}" for k, v in ours.items() if v is not None)
    forwarded = harness_argv(list(harness_args), model_args)
    if quiet and not any(a in ("-v", "--verbosity") or a.startswith("--verbosity=") for a in forwarded):
        forwarded += ["--verbosity", "WARNING"]
    argv = ["lm-eval", "run", "--model", MODEL_NAME, "--model_args", model_args, *forwarded]

    # lm-eval's command line prints the table and writes --output_path itself; -o also wants the results
    # dict, which it does not hand back: catch it on its way out of simple_evaluate, which the command
    # looks up on the lm_eval module when it runs.
    results = {}

    def simple_evaluate(*args, **kwargs):
        results["value"] = evaluator_simple_evaluate(*args, **kwargs)
        return results["value"]
    from lm_eval.evaluator import simple_evaluate as evaluator_simple_evaluate
    saved_argv, saved = sys.argv, lm_eval.__dict__.get("simple_evaluate")
    lm_eval.simple_evaluate = simple_evaluate
    try:
        sys.argv = argv
        cli_evaluate()
    finally:
        sys.argv = saved_argv
        if saved is None:
            del lm_eval.simple_evaluate         # back to the module's own lazy lookup
        else:
            lm_eval.simple_evaluate = saved
    if output and results.get("value") is not None:
        tmp = f"{output}.partial-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results["value"], f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        os.replace(tmp, output)
        notice(quiet, f"wrote {output}")


def harness_argv(args, model_args):
    """lm-eval's options as given, with "-" in option names read as "_" (click's spelling, lm-eval's).
    --model is ours to set; a --model_args of the user's is refused rather than silently merged."""
    out = []
    for arg in args:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("-", "_").replace("__", "--", 1) + eq + value
            if name in ("--model", "--model_args", "--model-args"):
                raise GenerationError(f"{name}: this command sets the model ({MODEL_NAME}, {model_args}); give "
                                      "the model's settings as this command's own options")
        elif arg in ("-M", "-a"):
            raise GenerationError(f"{arg}: this command sets the model ({MODEL_NAME}); give the model's "
                                  "settings as this command's own options")
        out.append(arg)
    return out
