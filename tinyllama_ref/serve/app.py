"""The FastAPI app and the uvicorn server around it.

Why FastAPI on uvicorn: it is the stack people already run model servers on (vLLM's and many
OpenAI-compatible servers' routes are FastAPI), it validates request bodies from type-annotated models into
clear messages, and server-sent events are a StreamingResponse. uvicorn handles SIGINT/SIGTERM with a
graceful shutdown. Both stay out of the engine: only tinyllama_ref/serve imports them.

Errors come out in the shape of the API that was called: {"error": {"message", "type", "param", "code"}} on
/v1/... (OpenAI) and {"error", "error_type"} elsewhere (TGI).
"""

import socket
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from ..errors import TinyLlamaError
from . import openai, tgi
from .jobs import ServeError
from .server import Options, ServerState

TGI_STATUS = {"validation": 422, "not_found": 404, "overloaded": 503, "unavailable": 503, "generation": 500}


def error_response(request, error):
    """A ServeError (or any of the project's errors: a bad request) in the called API's JSON shape."""
    if not isinstance(error, ServeError):
        error = ServeError(str(error))
    if request.url.path.startswith("/v1/"):
        return JSONResponse(openai.openai_error(error), status_code=openai.openai_status(error))
    return JSONResponse({"error": str(error), "error_type": error.kind}, status_code=TGI_STATUS[error.kind])


def describe_validation(exc):
    """Pydantic's list of problems as one sentence per problem: 'parameters.max_new_tokens: ...'."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        else:
            got = err.get("input")
            parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}"
                         + ("" if isinstance(got, dict) or err.get("type") == "missing" else f", got {got!r}"))
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


class CountResponses:
    """Pure ASGI middleware counting responses by route and status. (Starlette's BaseHTTPMiddleware would
    hide client disconnects from the routes, which need them to free a slot.)"""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                route = scope.get("route")
                self.metrics.response(getattr(route, "path", "other"), message["status"])
            await send(message)
        await self.app(scope, receive, counting_send)


def create_app(state):
    @asynccontextmanager
    async def lifespan(app):
        yield
        state.stop()                         # after uvicorn's graceful wait: answer what is left, then stop
        state.log("stopped")

    app = FastAPI(title="tinyllama-ref", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state

    @app.exception_handler(ServeError)
    async def serve_error(request, exc):
        return error_response(request, exc)

    @app.exception_handler(TinyLlamaError)
    async def project_error(request, exc):
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request, exc):
        return error_response(request, ServeError(describe_validation(exc)))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        kind = "not_found" if exc.status_code == 404 else "validation"
        response = error_response(request, ServeError(f"{request.method} {request.url.path}: {exc.detail}", kind))
        response.status_code = exc.status_code
        return response

    app.add_middleware(CountResponses, metrics=state.metrics)

    @app.get("/health")
    async def health():
        state.ready()                        # 503 while loading, after a failure, during shutdown
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(tgi.router)
    app.include_router(openai.router)
    return app


def run(options, log=None):
    """Serve until SIGINT/SIGTERM; True when the model loaded (False: it failed, the error was logged)."""
    import uvicorn

    state = ServerState(options, log)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.begin_shutdown()           # waiting requests get 503 now; running ones finish
            super().handle_exit(sig, frame)
            self._captured_signals.clear()   # a clean shutdown exits with 0, not by re-raising the signal

    sock = listen(options.host, options.port)      # before loading: a busy port is a one-line error at once
    options.port = sock.getsockname()[1]            # --port 0: the port the system chose
    config = uvicorn.Config(create_app(state), host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=options.shutdown_timeout + 5, lifespan="on")
    server = Server(config)

    def failed():
        server.should_exit = True
    state.on_failure = failed
    state.log(f"loading {options.checkpoint}; http://{options.host}:{options.port}/health answers 503 until "
              f"it is ready")
    state.start()
    server.run(sockets=[sock])
    return state.status != "failed"


def listen(host, port):
    """A bound TCP socket for uvicorn, or ServeError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --host or --port")
    return sock


__all__ = ["create_app", "run", "Options"]
