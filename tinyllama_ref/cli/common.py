"""Pieces every CLI command shares: model and sampling options, opening a model, prompt files, records."""

import json
import sys
import time

import click

from ..errors import GenerationError
from ..jsonl import read_jsonl


def parse_ids(text):
    """'1,306,4658' -> [1, 306, 4658]."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise click.BadParameter("no token ids given")
    return ids


THREADS = "tinyllama_ref.threads"          # where --threads waits in the click context for open_model


def _check_threads(ctx, param, value):
    """--threads, checked when it is parsed; open_model passes it to load(threads=)."""
    from ..errors import TinyLlamaError
    from ..threads import parse_threads
    if value is None:
        return
    try:
        parse_threads(value, "--threads")
    except TinyLlamaError as e:
        raise click.BadParameter(str(e).replace("--threads must", "must")) from None
    ctx.meta[THREADS] = value


def cli_threads():
    """The running command's --threads (None when not given: load()'s default, "auto")."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(THREADS) if ctx is not None else None


def cap_cpu(ctx, param, value):
    """--cpu TIER caps the kernels' CPU tier for this process, as TINYLLAMA_CPU does (kernels/cpu.py): it must
    act before anything compiles, so it applies as the option is read."""
    if value is None:
        return
    from ..kernels import cpu
    try:
        cpu.apply_cap(value)
    except cpu.TierError as e:
        raise click.BadParameter(str(e).replace(f"TINYLLAMA_CPU={value} is", f"{value} is")) from None


def model_options(f):
    """Options shared by every command that runs a model."""
    f = click.option("--cpu", default=None, metavar="TIER", expose_value=False, callback=cap_cpu,
                     is_eager=True, help="Cap the kernels' CPU tier: generic, avx2, avx512, vnni or amx (default: "
                                         "this CPU's; the same as TINYLLAMA_CPU). See docs/kernels.md.")(f)
    f = click.option("--threads", default=None, metavar="N|auto", expose_value=False, callback=_check_threads,
                     help="Threads for the kernels. auto (default): all cores, but decode passes leave the cores "
                          "other processes hold (measured from /proc/stat before each pass).")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress or notices on stderr.")(f)
    f = click.option("--max-memory", default=None, metavar="SIZE",
                     help="Memory budget, e.g. 20GB, 1500MB or bytes (default: 85% of available memory).")(f)
    f = click.option("--gptq-mode", type=click.Choice(["exact", "int8"]), default="exact", show_default=True,
                     help="exact: float32 GPTQ kernels; int8: opt-in approximate (activations rounded to int8 "
                          "per block of 32 for 4-bit decode and 3/4-bit prefill; CPU tier avx2 and above).")(f)
    f = click.option("--backend", type=click.Choice(["numba", "numpy"]), default="numba", show_default=True,
                     help="numba: fast kernels; numpy: the readable reference.")(f)
    return f


def sampling_options(f):
    """Sampling flags; anything left out comes from the checkpoint's generation_config.json."""
    opts = [
        click.option("--seed", type=int, default=None, help="Random seed: the same seed gives the same text."),
        click.option("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats."),
        click.option("--min-p", type=float, default=None, help="Drop tokens below min_p x the top probability."),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass, in (0, 1]."),
        click.option("--top-k", type=int, default=None, help="Keep the k most likely tokens (0: off)."),
        click.option("--temperature", "-t", type=float, default=None, help="0 = greedy."),
        click.option("--greedy", is_flag=True, help="Same as --temperature 0."),
    ]
    for o in opts:
        f = o(f)
    return f


def sampling_kwargs(greedy, temperature, top_k, top_p, min_p, repetition_penalty, seed):
    return dict(temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed)


def notice(quiet, text):
    if not quiet:
        click.echo(text, err=True)


def open_model(checkpoint, backend, max_memory, quiet=True, gptq_mode="exact", threads=None):
    """load() with the command's options; threads defaults to the command's --threads."""
    from .. import load
    t = time.perf_counter()
    if not quiet and sys.stderr.isatty():
        click.echo(f"loading {checkpoint} ...", err=True)
    model = load(checkpoint, backend=backend, max_memory=max_memory, gptq_mode=gptq_mode, quiet=True,
                 threads=cli_threads() if threads is None else threads)
    model.load_seconds = time.perf_counter() - t
    if model.layers.n_resident < model.layers.n_layers:        # worth knowing: this run reads from disk
        notice(quiet, model.layers.describe())
    return model


def resolve_template(model, template):
    from ..templates import default_template
    if template in (None, "auto"):
        return default_template(model.tokenizer)
    return template


def read_prompts_file(path):
    """JSONL: each line {"prompt": text} or {"prompt_ids": [ids]} (optionally "system"), or a bare string.

    Each record is checked here, naming the file and line: "prompt" a string, "prompt_ids" a non-empty flat
    list of integers >= 0 (it wins when both are given, as in this command's own output records), "system" a
    string or null.
    """
    out = []
    for where, obj in read_jsonl(path, "prompts"):
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict) or not ({"prompt", "prompt_ids"} & set(obj)):
            raise GenerationError(f"{where}: expected an object with \"prompt\" or \"prompt_ids\"")
        ids = obj.get("prompt_ids")
        if ids is not None:
            if (not isinstance(ids, list) or not ids
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
                raise GenerationError(f"{where}: \"prompt_ids\" must be a non-empty flat list of token ids "
                                      f"(integers >= 0), found {json.dumps(ids)[:60]}")
        elif not isinstance(obj.get("prompt"), str):
            raise GenerationError(f"{where}: \"prompt\" must be a string, found {json.dumps(obj.get('prompt'))[:60]}")
        if obj.get("system") is not None and not isinstance(obj["system"], str):
            raise GenerationError(f"{where}: \"system\" must be a string, found {json.dumps(obj['system'])[:60]}")
        out.append(obj)
    return out


def completion_record(model, c, prompt_text=None):
    per_token = c.token_seconds
    return {
        "prompt": prompt_text, "prompt_ids": c.prompt_ids, "completion": c.text, "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "timings": {"load_s": round(getattr(model, "load_seconds", 0.0), 4),
                    "prefill_s": round(c.prefill_seconds, 4),
                    "prefill_tokens_per_s": round(len(c.prompt_ids) / c.prefill_seconds, 3)
                    if c.prefill_seconds else None,
                    "per_token_s": [round(s, 5) for s in per_token],
                    "decode_tokens_per_s": round(len(per_token) / sum(per_token), 3) if per_token else None},
    }
