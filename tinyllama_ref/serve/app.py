"""The FastAPI app and the uvicorn server around it.

Why FastAPI on uvicorn: it is the stack people already run model servers on (vLLM's and many
OpenAI-compatible servers' routes are FastAPI), it validates request bodies from type-annotated models into
clear messages, and server-sent events are a StreamingResponse. uvicorn handles SIGINT/SIGTERM with a
graceful shutdown. Both stay out of the engine: only tinyllama_ref/serve imports them.

Errors come out in the shape of the API that was called: {"error": {"message", "type", "param", "code"}} on
/v1/... (OpenAI) and {"error", "error_type"} elsewhere (TGI). Every 503 carries Retry-After.

With an API key every route but the probes (/health, /metrics) wants `Authorization: Bearer KEY`: a load
balancer's health check and a Prometheus scraper rarely carry secrets, and they reveal no text. Browsers
need --cors-origin: CORS sits outside the key check, so a preflight (which never carries the key) is
answered, and a 401 still has the headers that let the page read it.
"""

import hmac
import socket
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException

from ..errors import TinyLlamaError
from . import openai, tgi, tokenize
from .jobs import ServeError
from .server import Options, ServerState

TGI_STATUS = {"validation": 422, "not_found": 404, "overloaded": 503, "unavailable": 503, "generation": 500}
RETRY_AFTER_SECONDS = 1              # a queue drains in seconds; while loading, /health says when to come back
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key


def error_response(request, error):
    """A ServeError (or any of the project's errors: a bad request) in the called API's JSON shape."""
    if not isinstance(error, ServeError):
        error = ServeError(str(error))
    if request.url.path.startswith("/v1/"):
        return JSONResponse(openai.openai_error(error), status_code=openai.openai_status(error))
    return JSONResponse({"error": str(error), "error_type": error.kind}, status_code=TGI_STATUS[error.kind])


def validation_error(exc):
    """A ServeError for pydantic's problems, naming the first field (OpenAI's error.param)."""
    error = ServeError(describe_validation(exc))
    fields = [".".join(str(x) for x in e.get("loc", ()) if x != "body") for e in exc.errors()]
    error.param = next((f for f in fields if f), None)
    return error


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


class RetryAfter:
    """Pure ASGI middleware: a 503 without Retry-After gets one (clients and proxies wait that long)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_retry(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = MutableHeaders(scope=message)
                headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
            await send(message)
        await self.app(scope, receive, send_with_retry)


class RequireApiKey:
    """Pure ASGI middleware: `Authorization: Bearer KEY` on every path but OPEN_PATHS, else 401 with
    WWW-Authenticate: Bearer (RFC 6750). compare_digest takes the same time wherever the strings differ."""

    def __init__(self, app, key):
        self.app, self.key = app, key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self.key):
            return await self.app(scope, receive, send)
        message = ("this server wants an API key: send the header 'Authorization: Bearer KEY' with the key "
                   "given to tinyllama-ref serve --api-key" if not token else "the API key is not the right one")
        if scope["path"].startswith("/v1/"):
            body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                              "code": "invalid_api_key"}}
        else:
            body = {"error": message, "error_type": "unauthorized"}
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


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


def create_app(state, api_key=None, cors_origins=()):
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
        return error_response(request, validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        kind = "not_found" if exc.status_code == 404 else "validation"
        response = error_response(request, ServeError(f"{request.method} {request.url.path}: {exc.detail}", kind))
        response.status_code = exc.status_code
        return response

    if api_key:
        app.add_middleware(RequireApiKey, key=api_key)
    if cors_origins:                         # outside the key check: preflights never carry the key
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(RetryAfter)
    app.add_middleware(CountResponses, metrics=state.metrics)

    @app.get("/health")
    async def health():
        state.ready()                        # 503 while loading, after a failure, during shutdown
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(tgi.router)
    app.include_router(tokenize.router)
    app.include_router(openai.router)
    return app


def run(options, log=None, api_key=None, cors_origins=()):
    """Serve until SIGINT/SIGTERM; True when the model loaded (False: it failed, the error was logged).
    api_key: wanted as a bearer token on every route but /health and /metrics; cors_origins: the browser
    origins allowed to call (["*"]: any)."""
    import uvicorn

    state = ServerState(options, log)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.begin_shutdown()           # waiting requests get 503 now; running ones finish
            super().handle_exit(sig, frame)
            self._captured_signals.clear()   # a clean shutdown exits with 0, not by re-raising the signal

    sock = listen(options.host, options.port)      # before loading: a busy port is a one-line error at once
    options.port = sock.getsockname()[1]            # --port 0: the port the system chose
    config = uvicorn.Config(create_app(state, api_key, cors_origins), host=options.host, port=options.port,
                            log_level="warning", timeout_graceful_shutdown=options.shutdown_timeout + 5, lifespan="on")
    server = Server(config)

    def failed():
        server.should_exit = True
    state.on_failure = failed
    state.log(f"loading {options.checkpoint}; http://{options.host}:{options.port}/health answers 503 until "
              f"it is ready")
    if api_key:
        state.log("every route but /health and /metrics wants 'Authorization: Bearer' with the API key")
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
