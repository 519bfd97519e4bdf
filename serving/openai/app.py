"""The FastAPI app: routes to the endpoint handlers, strict body parsing, errors, auth, metrics.

Bodies are read and parsed here, not by FastAPI: a size limit (413) before reading it all, a
nesting-depth limit before validation, then the strict pydantic model; so every client mistake
is a 400 in OpenAI's shape (never FastAPI's 422), and JSON that could crash a parser further
down never leaves this process.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.openai import chat, completions, models
from serving.openai.chat_template import load_chat_template
from serving.openai.engine import Engine, Loop, until_disconnected
from serving.openai.errors import OpenAIError, bad_request, from_validation_errors, unknown_model
from serving.openai.metrics import Metrics
from serving.openai.openapi import declare_request_bodies
from serving.openai.protocol import ChatCompletionRequest, CompletionRequest, fields_at

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20  # prompts are bounded by the context anyway; 4 MiB is generous
MAX_JSON_DEPTH = 16  # the deepest valid request (a message's content part) is 4
API_KEY_ENV = "GPTPIPE_API_KEY"


@dataclass(frozen=True)
class FrontendConfig:
    url: str = "localhost:8001"  # Triton's gRPC address
    served_model_name: str = "gptpipe"
    api_key: Optional[str] = None  # None: GPTPIPE_API_KEY if set, else no auth
    chat_template: Optional[Path] = None
    repository: Optional[Path] = None  # where to look for tokenizer/1/chat_template.jinja
    loop: Loop = "client"
    queue_timeout: float = 30.0  # a request waits this long for a free KV slot, then 503
    timeout_s: float = 60.0  # the most one step may take
    max_body_bytes: int = MAX_BODY_BYTES


def _error(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


async def _body(request: Request, model: type[BaseModel], limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise OpenAIError(413, f"request body of {length} bytes is over the limit of {limit} bytes",
                          code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except RecursionError:
        raise bad_request(f"request body is nested too deeply (limit {MAX_JSON_DEPTH})", None) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {type(data).__name__}", None)
    if _depth(data) > MAX_JSON_DEPTH:
        raise bad_request(f"request body is nested too deeply (limit {MAX_JSON_DEPTH})", None)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_errors(e.errors(), lambda loc: fields_at(model, loc)) from None


class _Observe:
    """Pure ASGI middleware: the API key, requests by endpoint and status, latency, in flight.
    (Not BaseHTTPMiddleware: that one gets in the way of streamed responses and disconnects.)"""

    def __init__(self, app: Any, metrics: Metrics, api_key: Optional[str]) -> None:
        self.app, self.metrics, self.api_key = app, metrics, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in _ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        if self.api_key and path.startswith("/v1/") and not self._authorized(scope):
            response = _error(OpenAIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key"))
            self.metrics.request_done(endpoint, 401, 0.0)
            return await response(scope, receive, send)
        status, start = 500, time.perf_counter()

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        counted = path.startswith("/v1/")
        self.metrics.in_flight += counted
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight -= counted
            self.metrics.request_done(endpoint, status, time.perf_counter() - start)

    def _authorized(self, scope: dict) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())


_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/version")


def create_app(config: FrontendConfig) -> FastAPI:
    engine = Engine(config.url, loop=config.loop, queue_timeout=config.queue_timeout, timeout_s=config.timeout_s)
    metrics = Metrics()
    template, source = load_chat_template(config.chat_template, config.repository)
    name = config.served_model_name
    api_key = config.api_key if config.api_key is not None else os.environ.get(API_KEY_ENV) or None

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logger.info("OpenAI frontend for %s: model %r, chat template %s, %s-side loop", config.url, name,
                    source, config.loop)
        yield
        await engine.close()

    app = FastAPI(title="gptpipe OpenAI-compatible API", version=models.version()["version"], lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.chat_template_source = engine, metrics, source

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, e: OpenAIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(OpenAIError(e.status_code, message, code=code, headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(from_validation_errors(e.errors(), lambda loc: []))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error answering %s", request.url.path)
        return _error(OpenAIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    def check_model(model: str) -> None:
        if model != name:
            raise unknown_model(model, name)

    async def answer(request: Request, result: Any) -> Any:
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(result.model_dump())

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Any:
        req = await _body(request, CompletionRequest, config.max_body_bytes)
        check_model(req.model)
        work = completions.create_completion(req, engine, metrics, name)
        return await answer(request, await work if req.stream else await until_disconnected(request, work))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Any:
        req = await _body(request, ChatCompletionRequest, config.max_body_bytes)
        check_model(req.model)
        work = chat.create_chat_completion(req, engine, metrics, name, template)
        return await answer(request, await work if req.stream else await until_disconnected(request, work))

    @app.get("/v1/models")
    async def list_models() -> Any:
        return (await models.list_models(engine, name)).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Any:
        return (await models.get_model(engine, name, model_id)).model_dump()

    @app.get("/health")
    async def health() -> Any:
        ready, details = await models.health(config.url)
        return JSONResponse({"status": "ready" if ready else "not ready", **details},
                            status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics_text() -> Any:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/version")
    async def version() -> Any:
        return models.version()

    declare_request_bodies(app, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest})

    return _Observe(app, metrics, api_key)  # type: ignore[return-value]


def serve(config: FrontendConfig, *, host: str = "127.0.0.1", port: int = 9000, log_level: str = "warning") -> None:
    """Run the frontend with uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                h11_max_incomplete_event_size=64 * 1024)
