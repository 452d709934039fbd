"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Invalid input 400 (``param`` names the field), missing or wrong API key 401, unknown model
404, pipeline not ready or a stage lost 503, too many requests waiting 503 with a
``Retry-After`` header. A validation error of the request models is a 400 like any other bad
input (never FastAPI's 422), its message naming the field.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from molink.coordinator.head_loop import PipelineNotReady, StageUnavailable
from molink.coordinator.prompts import RequestError
from molink.entrypoints.admission import ServerOverloaded
from molink.entrypoints.protocol import SamplingFields

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500  # error messages quote user values; keep them readable
SERVICE_ERRORS = (PipelineNotReady, StageUnavailable, ServerOverloaded)  # all 503
_PARAMS = frozenset(SamplingFields.SAMPLING) | {"max_tokens", "logprobs", "n", "prompt"}
_LOCATIONS = {"body", "query", "path", "header", "cookie"}  # FastAPI's first loc element
# Fields whose type errors read better as one sentence than as pydantic's union branches.
_HINTS = {"prompt": "prompt must be a non-empty string, a non-empty list of token ids, or a "
                    "non-empty list of either",
          "messages": "messages must be a non-empty list of {role, content} objects"}


def error(status: int, message: str, kind: str = "invalid_request_error",
          param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "..."
    return JSONResponse(status_code=status, headers=headers, content={"error": {
        "message": message, "type": kind, "param": param, "code": status}})


def failure(exc: Exception) -> JSONResponse:
    """The answer to a request that failed with ``exc`` (a 503 or a 400)."""
    if isinstance(exc, ServerOverloaded):
        return error(503, str(exc), "service_unavailable",
                     headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, (PipelineNotReady, StageUnavailable)):
        return error(503, str(exc), "service_unavailable")
    return error(400, str(exc), param=getattr(exc, "param", None) or _param_of(str(exc)))


def invalid(exc: ValidationError | RequestValidationError) -> RequestError:
    """A validation error of the request models as one RequestError naming the field."""
    errors = exc.errors()
    first = next((e for e in errors if e["type"] == "value_error"), errors[0])
    path = [p for p in first["loc"] if not _is_tag(p)]
    if path and path[0] in _LOCATIONS:
        path = path[1:]
    if first["type"] == "json_invalid":
        return RequestError("request body is not valid JSON")
    if not path:
        return RequestError("request body must be a JSON object")
    param = str(path[0])
    where = param + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[1:])
    if first["type"] == "value_error":
        message = str(first["ctx"]["error"])
        return RequestError(message if message.startswith(param) else f"{where}: {message}",
                            param)
    if param in _HINTS:
        return RequestError(f"{_HINTS[param]} ({where}: {first['msg']})", param)
    if first["type"] == "missing":
        return RequestError(f"{where} is required", param)
    return RequestError(f"{where}: {first['msg']}, got {_show(first.get('input'))}", param)


def install_handlers(app: FastAPI) -> None:
    """Every error the app raises answers in OpenAI's shape."""

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return failure(invalid(exc))

    @app.exception_handler(ValueError)
    async def bad_input(_request, exc: ValueError):  # RequestError, SamplingParams' checks
        return failure(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail),
                     "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):  # a bug: still answer in OpenAI's shape
        logger.exception("unhandled error in the HTTP API")
        return error(500, f"internal error: {type(exc).__name__}", "internal_error")


def _is_tag(part) -> bool:
    """Pydantic names the branch of a union (``str``, ``list[int]``) in an error's loc."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


def _param_of(message: str) -> str | None:
    """SamplingParams' messages start with the field name."""
    name = message.split(" ", 1)[0]
    return name if name in _PARAMS else None


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."
