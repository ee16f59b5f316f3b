"""create_app(): state on app.state, routers, JSON errors, body limit and optional API key.

Errors are always `{"error": {"message", "type", "code"}}` with a 4xx for bad input; an unexpected
failure is a 500 with a generic message (the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from pathlib import Path
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge import __version__
from loraforge.engine import Engine
from loraforge.errors import LoraforgeError
from loraforge.jobs import JobQueue
from loraforge.serve.scheduler import Scheduler
from loraforge.store import Store

log = logging.getLogger("loraforge.serve")
DEFAULT_MAX_BODY = 32 * 1024 * 1024


ERROR_SCHEMA = {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {
    "error": {"type": "object", "required": ["message", "type", "code"], "additionalProperties": False,
              "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                             "code": {"type": ["string", "null"]}}}}}
# the answers any route may give besides its own (auth, hosts, size, validation, back-pressure, draining)
ERROR_STATUSES = {"400": "bad input", "401": "API key missing or wrong", "403": "request not addressed to this "
                  "machine (Host/Origin)", "404": "not found", "405": "method not allowed", "409": "conflict with "
                  "the store's state", "413": "body too large", "415": "unsupported media type", "422": "invalid "
                  "body or settings", "429": "queue full (Retry-After)", "500": "internal error",
                  "503": "shutting down"}


def document_errors(schema: dict) -> dict:
    """Every operation answers errors in one shape ({"error": {message, type, code}}), FastAPI's own 422
    included: say so in the OpenAPI document, so clients and schema checkers see what they will get."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/Error"}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            for status, description in ERROR_STATUSES.items():
                responses[status] = {"description": description, "content": {"application/json": {"schema": ref}}}
    schema["components"]["schemas"].pop("HTTPValidationError", None)
    schema["components"]["schemas"].pop("ValidationError", None)
    return schema


def error_body(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_, "code": code}})


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
          409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "server_unavailable"}


class BodyLimit:
    """Pure ASGI middleware: 413 for a body over the limit, by Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, 413, f"request body over {self.max_bytes} bytes", "body_too_large")
        received = 0
        over = False
        started = False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True  # the app may catch this (FastAPI turns it into a 400): `guarded_send` says 413
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if over:  # whatever the app makes of the interrupted body, the answer is 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_json(send, 413, f"request body over {self.max_bytes} bytes", "body_too_large")
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not started:
                started = True
                await _send_json(send, 413, f"request body over {self.max_bytes} bytes", "body_too_large")


class _TooLarge(Exception):
    pass


class Draining:
    """Pure ASGI middleware: once the server is stopping, every new request but /health gets 503."""

    def __init__(self, app, state):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.state.draining and scope.get("path") != "/health":
            return await _send_json(send, 503, "the server is shutting down", "shutting_down",
                                    [(b"retry-after", b"5")])
        return await self.app(scope, receive, send)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _hostname(value: str) -> str:
    """'127.0.0.1:5001' -> '127.0.0.1', '[::1]:5001' -> '::1', 'http://localhost:5001' -> 'localhost'."""
    value = value.split("://", 1)[-1].split("/", 1)[0].strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostCheck:
    """Pure ASGI middleware against DNS rebinding: a page on another site that resolves its own name to
    127.0.0.1 reaches this server with its name in `Host` (and in `Origin`). Only the names the server
    was started for are answered; anything else is 403. `/health` too, so a rebinding page learns
    nothing."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = _hostname(headers.get(b"host", b"").decode("latin-1"))
        origin = headers.get(b"origin")
        origin_host = _hostname(origin.decode("latin-1")) if origin and origin != b"null" else None
        if host not in self.allowed or (origin_host is not None and origin_host not in self.allowed):
            return await _send_json(send, 403, "this server answers only requests addressed to "
                                    f"{', '.join(sorted(self.allowed))} (set LORAFORGE_ALLOWED_HOSTS to add names)",
                                    "forbidden_host")
        return await self.app(scope, receive, send)


class ApiKey:
    """Pure ASGI middleware: with an API key set, every path but /health needs `Bearer KEY`.

    The path is the ASGI scope's own, never a URL rebuilt from the Host header.
    """

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path") or ""
        if scope["type"] != "http" or path in ("/health", "/") or path.startswith("/static/"):
            return await self.app(scope, receive, send)  # the page and its files hold no data; it asks for the key
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return await _send_json(send, 401, "missing or wrong API key (Authorization: Bearer ...)",
                                    "invalid_api_key")
        return await self.app(scope, receive, send)


async def _send_json(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": _TYPES.get(status, "error"), "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            msg = "body is not valid JSON"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


class DrainingServer:
    """uvicorn's server, stopping gently: on SIGTERM or Ctrl-C new requests get 503 while the requests in
    flight finish (at most `drain_timeout` seconds), then uvicorn shuts down (jobs' workers are stopped
    and their jobs marked interrupted by the lifespan). A second signal stops at once."""

    def __init__(self, config, *, drain_timeout: float = 30.0):
        import uvicorn

        app, timeout = config.app, drain_timeout

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if app.state.draining:
                    return super().handle_exit(sig, frame)
                app.state.draining = True
                log.warning("stopping: finishing requests in flight (at most %.0f s)", timeout)
                threading.Thread(target=self._drain_then_exit, args=(sig, frame), daemon=True).start()

            def _drain_then_exit(self, sig, frame):
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and (app.state.engine.busy() or self.server_state.tasks):
                    time.sleep(0.1)
                super().handle_exit(sig, frame)

        self.server = _Server(config)

    def run(self) -> None:
        self.server.run()


def _model_paths_inside(store: Store, allowed: list[str]):
    """The check every base model named in a request passes: a model file or folder (a path, a .gguf) must
    be inside the store; the models the server was started with (`--model`) are the operator's choice."""
    from loraforge.models.resolve import local_model_path

    root = store.root.resolve()

    def check(name) -> None:
        if not isinstance(name, str) or name in allowed:
            return
        local = local_model_path(name)
        if local is not None and not local.resolve().is_relative_to(root):
            raise LoraforgeError(f"model {local.name!r}: over HTTP a model file or folder must be inside the "
                                 "store (its data/ or models/ folder); serve another with `loraforge serve "
                                 "--model PATH`", field="model")
    return check


def create_app(store: Store | None = None, *, device: str = "auto", max_jobs: int | None = None,
               max_body: int | None = None, api_key: str | None = None, preload: list[str] | None = None,
               scheduler: bool = True, schedule: list | None = None, max_batch: int = 16,
               max_queued: int = 64, allowed_hosts: list[str] | None = None) -> FastAPI:
    store = store or Store()
    queue = JobQueue(store)
    engine = Engine(store, device, max_batch=max_batch, max_queued=max_queued)
    max_jobs = max_jobs or int(os.environ.get("LORAFORGE_MAX_JOBS_PER_DEVICE", "1"))
    nightly = None
    if schedule:
        from loraforge.nightly import Nightly

        nightly = Nightly(queue, schedule, engine.placement.device)
    sched = Scheduler(queue, engine.placement.device, max_jobs, nightly=nightly)
    engine.check_model = _model_paths_inside(store, preload or [])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if scheduler:
            sched.start()
        for name in preload or []:
            engine.load_base(name)
        yield
        if scheduler:
            sched.stop()
        engine.close()

    app = FastAPI(title="loraforge", version=__version__, lifespan=lifespan,
                  description="Train, store, serve and validate LoRA adapters.")

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            app.openapi_schema = document_errors(get_openapi(title=app.title, version=app.version,
                                                             description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi
    app.state.store = store
    app.state.queue = queue
    app.state.engine = engine
    app.state.scheduler = sched
    app.state.draining = False  # set on SIGTERM: new requests get 503 while those in flight finish

    @app.exception_handler(LoraforgeError)
    async def _lf_error(_request: Request, exc: LoraforgeError):
        response = error_body(exc.status, exc.message, _TYPES.get(exc.status, "invalid_request_error"), exc.code)
        if getattr(exc, "retry_after", None):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        return error_body(422, _validation_message(exc), "invalid_request_error", "invalid_body")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_body(exc.status_code, message, _TYPES.get(exc.status_code, "error"), None)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_body(500, "internal server error", "server_error", "internal_error")

    @app.get("/health", tags=["server"])
    def health():
        return {"status": "ok", "version": __version__, "device": engine.placement.device}

    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    from loraforge.serve import (continuous_routes, eval_routes, openai_routes, registry_routes, training_routes,
                                 tuning_routes)

    static = Path(__file__).resolve().parent / "static"
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    def dashboard():
        """The dashboard: one page over the same HTTP API (files inside the package, nothing from a CDN)."""
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    app.include_router(training_routes.router)
    app.include_router(continuous_routes.router)  # before registry's {name:path} routes
    app.include_router(registry_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(eval_routes.router)
    app.include_router(tuning_routes.router)

    limit = max_body or int(os.environ.get("LORAFORGE_MAX_BODY_BYTES", DEFAULT_MAX_BODY))
    app.add_middleware(BodyLimit, max_bytes=limit)
    app.add_middleware(Draining, state=app.state)
    key = api_key if api_key is not None else os.environ.get("LORAFORGE_API_KEY")
    if key:
        app.add_middleware(ApiKey, key=key)
    extra = [h.strip().lower() for h in os.environ.get("LORAFORGE_ALLOWED_HOSTS", "").split(",") if h.strip()]
    if "*" not in extra:
        app.add_middleware(HostCheck, allowed=LOOPBACK_HOSTS | set(allowed_hosts or ()) | set(extra))
    return app
