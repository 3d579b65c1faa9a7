"""An HTTP server that speaks TGI's and OpenAI's APIs, with continuous batching (extra: [serve]).

    scheduler.py  one thread owns the model: KV-cache slots, the queue, one ragged forward pass per step
    jobs.py       what a route hands the scheduler (Job) and the events it gets back; ServeError
    bridge.py     events from the scheduler thread onto the event loop; client disconnects
    server.py     options, loading (GET /health is 503 until done), checks both APIs share
    tgi.py        POST /generate, /generate_stream, /, GET /info (TGI's JSON)
    openai.py     GET /v1/models, POST /v1/completions, /v1/chat/completions (OpenAI's JSON)
    metrics.py    GET /metrics in Prometheus text
    app.py        the FastAPI app, error shapes, uvicorn and SIGTERM
    loadtest.py   concurrent streaming clients for measuring a server (standard library only)

Only this package imports FastAPI and uvicorn; `tinyllama-ref serve` (cli/serve.py) says how to install them.
"""
