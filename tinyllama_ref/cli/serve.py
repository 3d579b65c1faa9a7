"""serve: the TGI- and OpenAI-compatible HTTP server (tinyllama_ref/serve), an optional extra."""

import sys

import click

from ..errors import TinyLlamaError
from .common import cap_cpu


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory budget, e.g. 20GB (default: 85% of available memory); the KV pool counts in it.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Sequences advanced together by each pass (as many as the KV pool has blocks for).")
@click.option("--max-queue", type=click.IntRange(0, 100000), default=64, show_default=True,
              help="Sequences that may wait for a slot; more get 503 overloaded.")
@click.option("--max-context", type=click.IntRange(2, None), default=None,
              help="Positions per sequence (prompt + new tokens; default: the model's context).")
@click.option("--kv-pool", default=None, metavar="SIZE",
              help="KV cache pool, e.g. 4GB (default: from the budget and the model; the startup log says "
                   "how many sequences of how many positions fit).")
@click.option("--kv-dtype", type=click.Choice(["f32", "f16"]), default="f32", show_default=True,
              help="Keys and values stored as float32 (exact) or float16 (half the memory; logits move slightly).")
@click.option("--no-prefix-cache", is_flag=True,
              help="Compute every prompt in full instead of reusing the keys and values of a shared prefix.")
@click.option("--prefill-chunk", type=click.IntRange(1, None), default=128, show_default=True,
              help="Prompt tokens fed per pass; longer prompts are fed over several passes.")
@click.option("--template", type=click.Choice(["auto", "chatml", "llama2", "none"]), default="auto",
              show_default=True, help="Chat template for /v1/chat/completions (auto: from the tokenizer files).")
@click.option("--gptq-mode", type=click.Choice(["exact", "int8"]), default="exact", show_default=True,
              help="exact: float32 GPTQ kernels; int8: opt-in approximate decode (4-bit layers only).")
@click.option("--backend", type=click.Choice(["numba", "numpy"]), default="numba", show_default=True)
@click.option("--cpu", default=None, metavar="TIER", expose_value=False, callback=cap_cpu, is_eager=True,
              help="Cap the kernels' CPU tier: generic, avx2, avx512, vnni or amx (as TINYLLAMA_CPU).")
@click.option("--model-name", default=None, help="Name in /v1/models and /info (default: the directory name).")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="Seconds running requests may take to finish after Ctrl-C / SIGTERM.")
@click.option("--api-key", envvar="TINYLLAMA_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                   "(or set TINYLLAMA_API_KEY).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="A browser origin allowed to call the server, e.g. http://localhost:3000 (repeatable; * for any).")
def serve(checkpoint, host, port, max_memory, max_batch, max_queue, max_context, kv_pool, kv_dtype,
          no_prefix_cache, prefill_chunk, template, gptq_mode, backend, model_name, shutdown_timeout, api_key,
          cors_origins):
    """Serve a checkpoint over HTTP with TGI's and OpenAI's APIs and continuous batching.

    \b
    Examples:
      tinyllama-ref serve ./Meditron-70B-GPTQ --max-memory 20GB --max-batch 8
      curl localhost:8080/generate -d '{"inputs": "Aspirin is", "parameters": {"max_new_tokens": 20}}' \\
           -H 'Content-Type: application/json'
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise TinyLlamaError("serve needs FastAPI and uvicorn: pip install -e '.[serve]' in the tinyllama-ref "
                             "source directory") from None
    from ..serve.app import run
    from ..serve.server import Options
    options = Options(checkpoint=checkpoint, host=host, port=port, max_memory=max_memory, max_batch=max_batch,
                      max_queue=max_queue, max_context=max_context, prefill_chunk=prefill_chunk,
                      kv_pool=kv_pool, kv_dtype=kv_dtype, prefix_cache=not no_prefix_cache,
                      template=template, gptq_mode=gptq_mode, backend=backend, model_name=model_name,
                      shutdown_timeout=shutdown_timeout)
    if not run(options, api_key=api_key, cors_origins=cors_origins):
        sys.exit(1)
