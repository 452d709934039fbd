"""The head's OpenAI-compatible HTTP API: ``/health``, ``/metrics``, ``/v1/models``,
``/v1/completions``, ``/v1/chat/completions`` and ``/generate``, vLLM's ``/tokenize``,
``/detokenize`` and ``/version``, described at ``/docs`` and ``/openapi.json``.

A request body is read once (at most MAX_BODY_BYTES, as JSON whatever its content type),
its ``model`` checked (404 for another model), then validated against its model in
``protocol`` (a wrong type is a 400 naming the field), turned into a ``Job`` (``job``: the
semantic checks, shared with every engine), admitted (``admission``: 503 with
``Retry-After`` when too many requests wait) and answered, whole or streamed (``answers``).
Every error is in OpenAI's shape (``api_errors``), never a bare 422 or 500 traceback.
With ``log_requests``, each request logs one line when received and one when it ends
(``request_log``). ``ApiOptions`` (``api_options``): the chat template, the reasoning parser
and CORS (no CORS headers unless origins are allowed).
"""

from __future__ import annotations

import dataclasses
import json

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

import molink
from molink.entrypoints.admission import DEFAULT_MAX_WAITING_REQUESTS, Admission
from molink.entrypoints.answers import Runner, answer, start_stream
from molink.entrypoints.api_errors import error, install_handlers, invalid
from molink.entrypoints.api_key import ApiKeyGuard
from molink.entrypoints.api_options import ApiOptions
from molink.entrypoints.job import chat_job, completion_job
from molink.entrypoints.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from molink.entrypoints.metrics import HeadMetrics
from molink.entrypoints.openai_format import ChatFormat, CompletionFormat
from molink.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from molink.entrypoints.reasoning import reasoning_parser
from molink.entrypoints.request_log import RequestLog
from molink.entrypoints.tokenization import detokenize, tokenize

MAX_BODY_BYTES = 4 * 1024 * 1024


def create_app(head, served_model_name: str, api_key: str | None = None,
               max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS, *,
               log_requests: bool = True, options: ApiOptions | None = None) -> FastAPI:
    """``head``: a PipelineHead. ``max_waiting_requests``: how many requests (choices) may
    wait in the head, not yet running, before new ones are answered 503 (``admission``).
    ``log_requests``: one INFO line per request received and ended. ``options``: chat
    template, reasoning parser, CORS (default: the tokenizer's template, none, none)."""
    options = options or ApiOptions()
    runner = Runner(head, Admission(max_waiting_requests), RequestLog(log_requests))
    app = FastAPI(title="MoLink", summary="OpenAI-compatible API of a MoLink pipeline",
                  redoc_url=None)
    app.state.admission = runner.admission
    if api_key:
        app.add_middleware(ApiKeyGuard, api_key=api_key)
    if options.allowed_origins:  # outermost: a preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins),
                           allow_methods=list(options.allowed_methods),
                           allow_headers=list(options.allowed_headers),
                           allow_credentials=options.allow_credentials)
    install_handlers(app)
    _add_monitoring_routes(app, head)
    _add_openai_routes(app, runner, served_model_name, options)
    _add_tokenizer_routes(app, head, served_model_name, options)
    _describe_bodies(app, (CompletionRequest, ChatCompletionRequest, TokenizeRequest,
                           DetokenizeRequest))
    return app


def _add_monitoring_routes(app: FastAPI, head) -> None:
    metrics = HeadMetrics(head)

    @app.get("/health")
    async def health():
        ready, detail = head.health()
        if not ready:
            return error(503, f"pipeline not ready: {detail}", "service_unavailable")
        return {"status": "ok", "pipeline": head.describe()}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)


def _add_openai_routes(app: FastAPI, runner: Runner, model: str, options: ApiOptions) -> None:
    head = runner.head

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model, "object": "model", "created": 0, "owned_by": "molink", "root": model,
            "parent": None, "max_model_len": head.max_model_len or None}]}

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        body = await _read(request, CompletionRequest, model)
        if not isinstance(body, CompletionRequest):
            return body  # another model: 404
        job = completion_job(body, head)
        return await _respond(runner, job, CompletionFormat(model, job), request)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = await _read(request, ChatCompletionRequest, model)
        if not isinstance(body, ChatCompletionRequest):
            return body
        job = chat_job(body, head, options)
        reasoning = reasoning_parser(options.reasoning_parser, body.chat_template_kwargs)
        return await _respond(runner, job, ChatFormat(model, job, reasoning), request)

    @app.post("/generate", openapi_extra=_body_schema(CompletionRequest))
    async def generate(request: Request):
        """A completion's text alone, never streamed."""
        body = await _read(request, CompletionRequest)
        job = dataclasses.replace(completion_job(body, head), stream=False)
        whole = await answer(runner, job, CompletionFormat(model, job), request)
        return whole if isinstance(whole, Response) else {"text": whole["choices"][0]["text"]}


def _add_tokenizer_routes(app: FastAPI, head, model: str, options: ApiOptions) -> None:
    @app.post("/tokenize", openapi_extra=_body_schema(TokenizeRequest))
    async def tokenize_route(request: Request):
        body = await _read(request, TokenizeRequest, model)
        return tokenize(body, head, options.chat_template) \
            if isinstance(body, TokenizeRequest) else body

    @app.post("/detokenize", openapi_extra=_body_schema(DetokenizeRequest))
    async def detokenize_route(request: Request):
        body = await _read(request, DetokenizeRequest, model)
        return detokenize(body, head) if isinstance(body, DetokenizeRequest) else body

    @app.get("/version")
    async def version():
        return {"version": molink.__version__}


async def _respond(runner: Runner, job, fmt, request: Request):
    if job.stream:
        return await start_stream(runner, job, fmt)
    return await answer(runner, job, fmt, request)


async def _read(request: Request, model_class: type[BaseModel], served: str | None = None):
    """The body as ``model_class`` (RequestError if it is not), or a 404 when it names
    another model than ``served``."""
    body = await _json_body(request)
    requested = body.get("model")
    if served is not None and isinstance(requested, str) and requested != served:
        return error(404, f"model {requested!r} does not exist; this server serves {served!r}",
                     "not_found_error", "model")
    try:
        return model_class.model_validate(body)
    except ValidationError as exc:
        raise invalid(exc) from None


async def _json_body(request: Request) -> dict:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise StarletteHTTPException(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise StarletteHTTPException(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise StarletteHTTPException(400, "request body must be a JSON object")
    return body


# ---- the API's description (/openapi.json, /docs) ------------------------------------------
# The bodies are read and validated by hand (any content type, a size limit, 400s in
# OpenAI's shape), so FastAPI does not see them: their schemas are added here.


def _body_schema(model_class: type[BaseModel]) -> dict:
    ref = {"$ref": f"#/components/schemas/{model_class.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _describe_bodies(app: FastAPI, model_classes) -> None:
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()  # cached by FastAPI in app.openapi_schema
            known = schema.setdefault("components", {}).setdefault("schemas", {})
            for model_class in model_classes:
                body = model_class.model_json_schema(ref_template="#/components/schemas/{model}")
                known.update(body.pop("$defs", {}))
                known[model_class.__name__] = body
        return app.openapi_schema

    app.openapi = openapi
