"""The `tinyllama-ref` command line: generate, chat, inspect, perplexity, score, and the tools.

Every command turns the project's own errors (bad files, bad arguments, too little memory) into one line on
stderr and exit code 1; a traceback means a bug in tinyllama-ref, not in your input. Text goes to stdout,
progress and notices to stderr.
"""

import json
import os
import sys

import click

from .common import (completion_record, model_options, notice, open_model, parse_ids, read_prompts_file,
                         resolve_template, sampling_kwargs, sampling_options)
from .distributed import (open_model_or_pipeline, open_pool, pipeline_options, pool_model_view,
                          pooled_iter_generate, ray_options)
from ..errors import GenerationError, TinyLlamaError
from ..jsonl import read_text


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
      tinyllama-ref synth ./tiny --preset tiny --bits 4 --group-size 32 --act-order
      tinyllama-ref generate ./tiny --prompt "The patient presented with" --max-new-tokens 32
      tinyllama-ref chat ./Meditron-70B-GPTQ --max-memory 20GB
      tinyllama-ref inspect ./Meditron-70B-GPTQ
    """


# -- generate ------------------------------------------------------------------------------------------------
def prompt_source(prompt, prompt_file, prompt_ids, prompts_file):
    """The one prompt source given, read and checked before any model loads: ("text", str),
    ("ids", [int]) or ("file", [records]); stdin when none is given and it is not a terminal."""
    given = [x is not None for x in (prompt, prompt_file, prompt_ids, prompts_file)]
    if sum(given) > 1:
        raise GenerationError("give only one of --prompt, --prompt-file, --prompt-ids, --prompts-file")
    if prompts_file is not None:
        return "file", read_prompts_file(prompts_file)
    if prompt_ids is not None:
        return "ids", parse_ids(prompt_ids)
    if prompt_file is not None:
        return "text", read_text(prompt_file, "prompt")
    if prompt is None:
        if sys.stdin.isatty():
            raise GenerationError("no prompt: use --prompt TEXT, --prompt-file, --prompt-ids or pipe text in")
        prompt = sys.stdin.read()
    return "text", prompt


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt", "-p", default=None, help="Prompt text (or use --prompt-file, or pipe it on stdin).")
@click.option("--prompt-file", type=click.Path(), default=None, help="Read the prompt text from a file.")
@click.option("--prompt-ids", default=None, help="Prompt as comma-separated token ids (no tokenizer needed).")
@click.option("--prompts-file", type=click.Path(), default=None,
              help="JSONL of prompts, run in batches; writes one JSONL record per prompt, in order.")
@click.option("--output", "-o", type=click.Path(), default=None,
              help="With --prompts-file: write the records here, a batch at a time.")
@click.option("--resume", is_flag=True, help="With -o: continue the file a killed run left.")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
              help="With --prompts-file: prompt tokens per batch (default: from the memory budget).")
@click.option("--template", type=click.Choice(["auto", "chatml", "llama2", "none"]), default="none",
              show_default=True, help="Wrap the prompt as a chat turn (auto: from the tokenizer files).")
@click.option("--system", default=None, help="System message for chat templates.")
@click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True)
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep going past the end-of-sequence token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of streaming text.")
@sampling_options
@ray_options
@pipeline_options
@model_options
def generate(checkpoint, prompt, prompt_file, prompt_ids, prompts_file, output, resume, batch_tokens, template,
             system, max_new_tokens, stop, ignore_eos, as_json, greedy, temperature, top_k, top_p, min_p,
             repetition_penalty, seed, backend, max_memory, quiet, gptq_mode, ray_address=None, workers=None,
             cpus_per_worker=1, pipeline_address=None, stages=2, cpus_per_stage=1):
    """Continue a prompt, streaming the text as it is produced.

    \b
    Examples:
      tinyllama-ref generate ./ckpt --prompt "Aspirin is" -n 32
      tinyllama-ref generate ./ckpt --prompt "What causes gout?" --template chatml --temperature 0.7 --seed 1
      echo "Once upon a time" | tinyllama-ref generate ./ckpt --json
      tinyllama-ref generate ./ckpt --prompt-ids 1,306,4658 -n 8          # prints new token ids
      tinyllama-ref generate ./ckpt --prompts-file prompts.jsonl -o out.jsonl [--resume]
      tinyllama-ref generate ./ckpt --prompts-file prompts.jsonl -o out.jsonl --ray auto --workers 4
      tinyllama-ref generate ./ckpt --prompt "Gout is" --pipeline auto --stages 2
    """
    from ..sampling import SamplingParams
    from ..templates import stop_conditions
    from .score import prepare_output
    kind, source = prompt_source(prompt, prompt_file, prompt_ids, prompts_file)
    if (output or resume or batch_tokens) and kind != "file":
        raise GenerationError("--output, --resume and --batch-tokens go with --prompts-file")
    if max_new_tokens < 0:
        raise GenerationError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if kind == "text" and not source.strip():
        raise GenerationError("empty prompt: give some text")
    old = prepare_output(output, resume)            # -o must be writable before anything runs
    params_kw = sampling_kwargs(greedy, temperature, top_k, top_p, min_p, repetition_penalty, seed)
    if ray_address and (kind != "file" or pipeline_address):
        raise GenerationError("--ray goes with --prompts-file (and not with --pipeline)")
    pool = open_pool(checkpoint, ray_address, workers, backend, max_memory, gptq_mode, cpus_per_worker, quiet)
    model = pool_model_view(checkpoint, pool) if pool else open_model_or_pipeline(
        checkpoint, pipeline_address, stages, backend, max_memory, gptq_mode, cpus_per_stage, quiet)
    params = SamplingParams.from_generation_config(checkpoint, **params_kw)
    if kind == "ids" and not os.path.exists(os.path.join(checkpoint, "tokenizer.model")):
        generate_ids_only(model, source, max_new_tokens, params, ignore_eos, as_json)
        return
    tok = model.tokenizer
    template = resolve_template(model, template)
    template_stops, template_stop_ids = stop_conditions(template, tok)
    stops = list(stop) + template_stops
    stop_ids = set() if ignore_eos else template_stop_ids
    if kind == "file":
        settings = {"backend": backend, "gptq_mode": gptq_mode, "template": template, "system": system,
                    "max_new_tokens": max_new_tokens, "stop": stops, "ignore_eos": ignore_eos,
                    "sampling": {k: getattr(params, k) for k in vars(params)}}
        generate_prompts_file(model, source, prompts_file, output, resume, old, batch_tokens, settings,
                              max_new_tokens, params, stops, stop_ids, quiet)
        return
    ids = source if kind == "ids" else model.encode_prompt(source, template, system)
    tok.check_ids(ids)
    generate_one(model, ids, source if kind == "text" else None, max_new_tokens, params, stops, stop_ids, as_json,
                 quiet)


def generate_ids_only(model, ids, max_new_tokens, params, ignore_eos, as_json):
    """Token ids in, token ids out: works without any tokenizer files."""
    from ..generate import run
    from ..sampling import Sampler
    outs = run(model, [ids], max_new_tokens, Sampler(params), set() if ignore_eos else set(model.cfg.eos_token_ids))
    if as_json:
        click.echo(json.dumps(completion_record(model, outs[0])))
    else:
        click.echo(",".join(str(i) for i in outs[0].token_ids))


def generate_one(model, ids, prompt, max_new_tokens, params, stops, stop_ids, as_json, quiet):
    """One prompt, its text streamed to stdout as it becomes printable (or one JSON record at the end)."""
    from ..generate import generate_text

    def stream(_, text):
        click.echo(text, nl=False)
        sys.stdout.flush()
    c = generate_text(model, model.tokenizer, [ids], max_new_tokens, params, stops, stop_ids=stop_ids,
                      on_text=None if as_json else stream)[0]
    if as_json:
        click.echo(json.dumps(completion_record(model, c, prompt)))
    else:
        click.echo("")
        if c.token_seconds:
            notice(quiet, f"[{len(c.token_ids)} tokens, prefill {c.prefill_seconds:.2f} s, "
                          f"{len(c.token_seconds) / sum(c.token_seconds):.2f} tokens/s, stop: {c.finish_reason}]")


def generate_prompts_file(model, items, prompts_file, output, resume, old, batch_tokens, settings, max_new_tokens,
                          params, stops, stop_ids, quiet):
    """Every prompt of the file, a batch at a time; each batch's records go to -o (fsync'ed) or stdout at once."""
    from ..eval.prompts import batch_starts, iter_generate
    if getattr(model, "pool", None):              # --ray: the same batches, on the workers
        iter_generate = pooled_iter_generate(model.pool)
    from ..eval.results import ResultsWriter, make_header
    from ..progress import Progress
    from .score import batch_tokens_for
    tok = model.tokenizer
    prompts = [it["prompt_ids"] if "prompt_ids" in it else
               model.encode_prompt(it["prompt"], settings["template"], it.get("system", settings["system"]))
               for it in items]
    for p in prompts:
        tok.check_ids(p)
    batch_tokens = batch_tokens_for(model, batch_tokens, old)
    settings = {**settings, "batch_tokens": batch_tokens}

    def record(i, c):
        return {"item": i + 1, **completion_record(model, c, items[i].get("prompt"))}
    bar = Progress("generating", len(items), enabled=not quiet, unit="prompts")
    batches = lambda skip: iter_generate(model, tok, prompts, max_new_tokens, params, stops, stop_ids,  # noqa: E731
                                         batch_tokens, skip=skip, make_record=record)
    if output:
        with ResultsWriter.open(output, make_header("generate", model.path, settings, prompts_file), resume,
                                boundaries=batch_starts(prompts, max_new_tokens, batch_tokens)) as writer:
            skipped = writer.n_done
            for records in batches(skipped):
                writer.append(records)
                bar.update(writer.n_done)
        bar.close()
        notice(quiet, f"wrote {writer.n_done} records to {output}" +
               (f" ({skipped} were already there)" if skipped else ""))
        return
    for records in batches(0):
        click.echo("".join(json.dumps(r) + "\n" for r in records), nl=False)
        sys.stdout.flush()
        bar.update(records[-1]["item"])
    bar.close()


# -- chat ----------------------------------------------------------------------------------------------------
@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--template", type=click.Choice(["auto", "chatml", "llama2", "none"]), default="auto",
              show_default=True, help="Chat format (auto: from the tokenizer files).")
@click.option("--system", default=None, help="System message.")
@click.option("--max-new-tokens", "-n", type=int, default=256, show_default=True, help="Per reply.")
@sampling_options
@model_options
def chat(checkpoint, template, system, max_new_tokens, greedy, temperature, top_k, top_p, min_p,
         repetition_penalty, seed, backend, max_memory, quiet, gptq_mode):
    """Talk to the model turn by turn. Type /reset to forget the history, /quit (or Ctrl-D) to leave.

    \b
    Example:
      tinyllama-ref chat ./Meditron-70B-GPTQ --system "You are a careful medical assistant." -t 0.7
    """
    from ..generate import generate_text
    from ..sampling import SamplingParams
    from ..templates import encode_chat, stop_conditions
    model = open_model(checkpoint, backend, max_memory, quiet, gptq_mode)
    tok = model.tokenizer
    template = resolve_template(model, template)
    params = SamplingParams.from_generation_config(
        checkpoint, **sampling_kwargs(greedy, temperature, top_k, top_p, min_p, repetition_penalty, seed))
    head = [{"role": "system", "content": system}] if system else []
    turns = []
    interactive = sys.stdin.isatty()
    notice(quiet or not interactive, f"chat template: {template}; /reset clears the history, /quit leaves")
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/quit":
            break
        if text.strip() == "/reset":
            turns = []
            notice(quiet, "(history cleared)")
            continue
        if not text.strip():
            continue
        # A message that cannot fit the context even alone is refused with one line, and the session goes on
        # with its history as it was; so does any other bad turn (an unreadable token, too little memory).
        message = {"role": "user", "content": text}
        try:
            alone = encode_chat(tok, head + [message], template)
            if len(alone) >= model.cfg.max_seq_len:
                raise GenerationError(f"this message alone is {len(alone)} tokens; the context is "
                                      f"{model.cfg.max_seq_len}. Send a shorter one (the history is kept)")
            candidate = turns + [message]
            while True:
                ids = encode_chat(tok, head + candidate, template)
                if len(ids) + min(max_new_tokens, 16) <= model.cfg.max_seq_len or len(candidate) <= 1:
                    break
                candidate = candidate[2:] if len(candidate) > 2 else candidate[-1:]
                notice(False, "(history trimmed: the oldest exchange was dropped to fit the context)")
            tok.check_ids(ids)

            def stream(_, piece):
                click.echo(piece, nl=False)
                sys.stdout.flush()
            strings, stop_ids = stop_conditions(template, tok)
            c = generate_text(model, tok, [ids], max_new_tokens, params, strings, stop_ids=stop_ids,
                              on_text=stream)[0]
        except TinyLlamaError as e:
            click.echo(f"error: {e}", err=True)
            continue
        click.echo("")
        turns = candidate + [{"role": "assistant", "content": c.text.strip()}]


# -- inspect -------------------------------------------------------------------------------------------------
@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--max-memory", default=None, metavar="SIZE", help="Budget to plan for (default: 85% available).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record.")
def inspect(checkpoint, max_memory, as_json):
    """Architecture, quantization, sizes, and the memory and speed to expect on this machine.

    \b
    Example:
      tinyllama-ref inspect ./Meditron-70B-GPTQ --max-memory 20GB
    """
    from ..measure.inspect import describe
    info = describe(checkpoint, max_memory)
    if as_json:
        click.echo(json.dumps(info))
        return
    width = max(len(k) for k in info)
    for k, v in info.items():
        click.echo(f"{k:<{width}}  {v}")
