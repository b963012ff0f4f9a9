"""The FastAPI application: clients of the engine cores started and stopped with the app, one gateway in front
of every route. An engine core that fails (its process died, or its engine failed and it exits) stops the
server with exit status 1 (see ``CORE_FAILED_EXIT_S``).

The gateway (a plain ASGI middleware, so streamed bodies pass through untouched) gives every response an
``x-request-id``, checks the API key, bounds the body size, counts the request in /metrics and writes one
JSON log line per request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.chat import HarmonyChatFormat, TemplateChatFormat, load_chat_template
from server.config import HTTPConfig, ServerConfig
from server.cors import AllowedOrigins
from server.engine.core_client import EngineCoreClient
from server.engine.core_startup import StartedCore
from server.engine.errors import EngineError, QueueFull
from server.engine.host_memory import release_free_heap
from server.metrics import Metrics
from server.openapi import install_openapi
from server.protocol import APIError, ErrorObject, ErrorResponse
from server.routes import (
    chat_completions,
    completions,
    conversations,
    embeddings,
    health,
    load,
    metrics,
    models,
    perplexity,
    ready,
    responses,
    sagemaker,
    scores,
    tokenize,
    version,
)
from server.routes.conversation_store import ConversationStore
from server.routes.engine_calls import ClientDisconnected
from server.routes.load import ServerLoad, counts_as_load
from server.routes.models import ServedModel
from server.routes.response_background import BackgroundRuns
from server.routes.response_store import ResponseStore
from server.stats_log import StatsLog
from server.tokenizer_info import tokenizer_info
from server.user_middleware import add_user_middleware
from server.validation_errors import validation_error_object

log = logging.getLogger("gptserve")
access_log = logging.getLogger("gptserve.access")

# Reachable without the API key, for probes (SageMaker's /ping among them) and scrapers.
OPEN_PATHS = ("/health", "/ready", "/metrics", "/version", "/ping", "/load")
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # a client's id is echoed back only if it is sane
CORE_FAILED_EXIT_S = 2.0  # after an engine core failed: its 503s are written and probes see /health 503, then exit


def create_app(config: ServerConfig, cores: dict[str, StartedCore]) -> FastAPI:
    """``cores``: every model's engine core, started and ready (server.engine.core_startup)."""
    frontend = config.frontend
    chat_template = load_chat_template(frontend.chat_template) if frontend.chat_template else None
    process_metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        created = int(time.time())
        for name, core in cores.items():
            engine = EngineCoreClient(core, config.engine.max_queue, process_metrics.for_model(name),
                                      on_failure=lambda: _core_failed(app))
            process_metrics.before_exposition(engine.metric_backlog.flush)
            engine.start()
            chat_format = (HarmonyChatFormat(engine.tokenizer) if engine.family == "gpt_oss"
                           else TemplateChatFormat(engine.tokenizer, chat_template, frontend.tool_call_parser))
            info = tokenizer_info(engine.tokenizer_dir, engine.tokenizer, engine.max_model_len,
                                  chat_format.template_text)
            assert core.generation is not None  # read by wait_for_cores
            app.state.models[name] = ServedModel(name, engine, chat_format, created, info, core.generation, frontend,
                                                 core.root)
            log.info("serving model", extra={"model": name, "family": engine.family,
                                              "max_model_len": engine.max_model_len})
        release_free_heap()  # what parsing the tokenizer and harmony's vocabulary freed: the tuned heap keeps it
        engines = {name: served.engine for name, served in app.state.models.items()}
        stats_log = None if config.disable_log_stats else asyncio.create_task(
            StatsLog(process_metrics, engines, config.log_stats_interval).run())
        yield
        if stats_log is not None:
            stats_log.cancel()
        for served in app.state.models.values():
            await served.engine.shutdown()

    documented = not config.http.disable_fastapi_docs
    app = FastAPI(title="gptserve", version=version.SERVER_VERSION, lifespan=lifespan,
                  openapi_url="/openapi.json" if documented else None,
                  docs_url="/docs" if documented else None, redoc_url="/redoc" if documented else None,
                  description="OpenAI-compatible serving of GPT-2 and GPT-OSS checkpoints.")
    # Set on the app, not by uvicorn: then a path that still has the prefix is served as well as one without it
    # (FastAPI's root_path argument is deprecated for uvicorn's, which serves only paths the proxy stripped).
    app.root_path = config.http.root_path
    app.state.models = {}
    names = config.served_model_names
    app.state.model_aliases = {alias: names[0] for alias in names[1:]}  # --served-model-name's further names
    app.state.exit_status = 0
    app.state.response_store = ResponseStore()
    app.state.conversations = ConversationStore()
    app.state.background_responses = BackgroundRuns()
    app.state.foreground_responses = {}  # stored responses in flight on their request's connection, by id
    app.state.metrics = process_metrics
    app.state.server_load = ServerLoad() if config.http.enable_server_load_tracking else None
    routers = [module.router for module in (completions, chat_completions, responses, conversations, perplexity,
                                            embeddings, scores, models, tokenize, health, ready, metrics, version,
                                            sagemaker)]
    if config.http.enable_server_load_tracking:
        routers.append(load.router)
    for router in routers:
        app.include_router(router)
    app.state.api_routes = [route for router in routers for route in router.routes if isinstance(route, APIRoute)]
    _add_error_handlers(app)
    install_openapi(app, [*cores, *app.state.model_aliases])
    add_user_middleware(app, config.http.middleware)  # before the gateway, so inside it
    app.add_middleware(Gateway, config=config.http, metrics=process_metrics, load=app.state.server_load)
    if config.http.allowed_origins:  # outside the gateway: a browser's preflight carries no API key
        app.add_middleware(AllowedOrigins, config=config.http)
    return app


def abort_in_flight(app: FastAPI) -> None:
    """SIGTERM's drain deadline: every model's requests still running end now, each with its 503."""
    log.warning("drain deadline passed: aborting the requests still in flight")
    for served in app.state.models.values():
        served.engine.abort_all()


def _core_failed(app: FastAPI) -> None:
    """An engine core failed or died: its model cannot serve again in this process. Stop the server (a drain for
    the other models' requests) with exit status 1, so that Docker or Kubernetes restarts it."""
    if app.state.exit_status == 0:
        app.state.exit_status = 1
        log.error("an engine core failed: the server stops in %.0f s with exit status 1", CORE_FAILED_EXIT_S)
        asyncio.get_running_loop().call_later(CORE_FAILED_EXIT_S, signal.raise_signal, signal.SIGTERM)


def error_response(status: int, error: ErrorObject, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=error).model_dump(), status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.error)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, e: EngineError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(e, QueueFull) else None
        return error_response(e.status, ErrorObject(message=e.message, type=e.type, param=e.param), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_error_object(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        headers = getattr(e, "headers", None)
        if e.status_code == 405:
            headers = (headers or {}) | {"Allow": ", ".join(allowed_methods(app.state.api_routes, request))}
        return error_response(e.status_code, ErrorObject(message=message, type=kind), headers)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": only the log ever sees it

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"request_id": request.state.request_id})
        return error_response(500, ErrorObject(message="internal server error", type="internal_error"))


def allowed_methods(routes: list[APIRoute], request: Request) -> list[str]:
    """Every method some route serves at this path: Starlette's 405 names only the first route's, and a path such
    as /v1/responses/{id} has one route per method."""
    methods = {method for route in routes if route.matches(request.scope)[0] != Match.NONE
               for method in route.methods or ()}
    return sorted(methods)


class Gateway:
    def __init__(self, app: ASGIApp, config: HTTPConfig, metrics: Metrics, load: ServerLoad | None = None) -> None:
        self.app = app
        self.config = config
        self.metrics = metrics
        self.load = load  # GET /load's count, kept only with --enable-server-load-tracking
        self._api_keys = [key.encode() for key in config.api_keys]
        self._open_paths = tuple(p for p in OPEN_PATHS if p != "/metrics" or not config.metrics_require_key)
        self._unlogged_paths = set(config.disable_access_log_for_endpoints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given_id = headers.get("x-request-id", "")
        request_id = given_id if REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        body = b""
        try:
            rejection = self._refuse(scope, headers)
            if rejection is None:
                body, rejection = await self._read_body(receive)
            if rejection is not None:
                await rejection(scope, receive, send_with_id)
                return
            if self.load is None or not counts_as_load(scope["method"], route_path(scope)):
                await self.app(scope, _replay(body, receive), send_with_id)
                return
            self.load.in_flight += 1
            try:
                await self.app(scope, _replay(body, receive), send_with_id)
            finally:
                self.load.in_flight -= 1
        finally:
            self._record(scope, request_id, status, time.perf_counter() - started, body)

    def _refuse(self, scope: Scope, headers: Headers) -> Response | None:
        if self._api_keys and route_path(scope) not in self._open_paths:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = token.strip().encode()
            matches = [hmac.compare_digest(given, key) for key in self._api_keys]  # every key, each in constant time
            if scheme.lower() != "bearer" or not any(matches):
                return error_response(401, ErrorObject(
                    message="missing or incorrect API key: send 'Authorization: Bearer <key>'",
                    type="invalid_request_error", code="invalid_api_key"))
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
            return self._too_large()
        return None

    async def _read_body(self, receive: Receive) -> tuple[bytes, Response | None]:
        """The whole body, up to --max-body-bytes whatever Content-Length claimed (chunked bodies have none),
        within --body-timeout: uvicorn has no deadline for a body, and a slow one holds its buffer meanwhile."""
        parts, size = [], 0
        try:
            async with asyncio.timeout(self.config.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return b"", Response(status_code=499)
                    parts.append(message.get("body", b""))
                    size += len(parts[-1])
                    if size > self.config.max_body_bytes:
                        return b"", self._too_large()
                    if not message.get("more_body", False):
                        return b"".join(parts), None
        except TimeoutError:
            return b"", error_response(408, ErrorObject(
                message=f"the request body did not arrive within --body-timeout ({self.config.body_timeout:g} s)",
                type="invalid_request_error", code="request_timeout"), headers={"Connection": "close"})

    def _too_large(self) -> Response:
        return error_response(413, ErrorObject(
            message=f"the request body exceeds --max-body-bytes ({self.config.max_body_bytes} bytes)",
            type="invalid_request_error", code="request_too_large"))

    def _record(self, scope: Scope, request_id: str, status: int, seconds: float, body: bytes) -> None:
        route = getattr(scope.get("route"), "path", None)
        self.metrics.count_http(route or "unmatched", scope["method"], status)
        line = {"request_id": request_id, "method": scope["method"], "route": route or scope["path"],
                "status": status, "latency_ms": round(seconds * 1000, 1)}
        usage = scope.get("state", {}).get("usage")
        if usage is not None:
            line |= usage().model_dump(exclude={"prompt_tokens_details"})
        if self.config.log_requests and body:
            line["body"] = body[:self.config.max_log_len].decode("utf-8", "replace")
        outputs = scope.get("state", {}).get("outputs")
        if self.config.log_outputs and outputs is not None:
            line["outputs"] = [clipped(output, self.config.max_log_len) for output in outputs()]
        if not (self.config.disable_access_log or route_path(scope) in self._unlogged_paths):
            access_log.info("request", extra=line)


def clipped(output: dict[str, Any], limit: int) -> dict[str, Any]:
    """A choice's output as logged: each text and list at most ``limit`` long, as a body is."""
    return {key: value[:limit] if isinstance(value, (str, list)) else value for key, value in output.items()}


def route_path(scope: Scope) -> str:
    """The path the routes see: without --root-path's prefix where the request still has it (as Starlette strips
    it), so a proxy may pass the prefix on or strip it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):] or "/"
    return path


def _replay(body: bytes, receive: Receive) -> Receive:
    """The app reads the body we already buffered; later receives (disconnect) go to the server."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
