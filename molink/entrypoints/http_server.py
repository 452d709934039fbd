"""The head's OpenAI-compatible HTTP API: ``/health``, ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` and ``/generate``.

Every request body is parsed once, at the edge, into a ``Job`` (token ids per prompt, one
SamplingParams per choice, what to report); a wrong type or an out-of-range value is a 400
naming the field, never a 500. Unknown fields are ignored; OpenAI fields this server cannot
honour (``echo``, ``suffix``, ``logit_bias``, tools, ...) are a 400 when set.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: invalid input
400, missing or wrong API key 401, unknown model 404, pipeline not ready or a stage lost 503,
too many requests waiting 503 with a ``Retry-After`` header (see admission control below).
Streaming answers are server-sent events (``data: {...}`` lines, then ``data: [DONE]``). A
request with ``n`` choices (or several prompts) runs one head request per choice,
concurrently::

    choice index = prompt index * n + j        seed of choice j = seed + j (when seeded)

A client that disconnects aborts every request of its answer.

Admission control: before any choice of a request starts, the requests waiting in the head
(queued in its scheduler, not yet running) plus the ones this app has admitted but not yet
handed to the head must leave room for all of the request's choices (each choice counts one),
within ``max_waiting_requests``. Otherwise the answer is at once a 503 "server overloaded"
with ``Retry-After``; nothing of the rejected request is left behind. A request with more
choices than the whole limit could never be admitted: it is a 400 naming ``n``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from molink.coordinator.pipeline_head import (
    PipelineHead,
    PipelineNotReady,
    StageUnavailable,
)
from molink.entrypoints.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from molink.entrypoints.metrics import HeadMetrics
from molink.entrypoints.openai_format import ChatFormat, CompletionFormat, Job
from molink.outputs import RequestOutput
from molink.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_ERROR_CHARS = 500  # error messages quote user values; keep them readable
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_INT_LIMIT = 2**31 - 1
_HUGE_INT = 2**64  # beyond every range SamplingParams accepts
# As many as --max-num-seqs' default: one more full batch may wait behind the running one.
DEFAULT_MAX_WAITING_REQUESTS = 256
MAX_RETRY_AFTER_S = 60  # what the openai client still honours as a delay

# Passed to SamplingParams as they are; SamplingParams checks types and ranges.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "min_tokens", "stop",
                    "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
                    "skip_special_tokens", "spaces_between_special_tokens")
# OpenAI fields this server does not implement: accepted only at their "off" value.
_UNSUPPORTED_COMPLETION = {"echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {})}
_UNSUPPORTED_CHAT = {"logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
                     "response_format": (None, {"type": "text"}), "audio": (None,),
                     "prediction": (None,)}


class RequestError(ValueError):
    """Bad user input; ``param`` names the offending field (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ServerOverloaded(Exception):
    """Too many requests wait in the head: a 503 with ``Retry-After``."""

    def __init__(self, num_waiting: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"server overloaded: {num_waiting} requests waiting (limit {limit}); "
                         "retry later")
        self.retry_after_s = retry_after_s


_SERVICE_ERRORS = (PipelineNotReady, StageUnavailable, ServerOverloaded)  # all 503


def error(status: int, message: str, kind: str = "invalid_request_error",
          param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "..."
    return JSONResponse(status_code=status, headers=headers, content={"error": {
        "message": message, "type": kind, "param": param, "code": status}})


def create_app(head: PipelineHead, served_model_name: str, api_key: str | None = None,
               max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS) -> FastAPI:
    """``max_waiting_requests``: how many requests (choices) may wait in the head, not yet
    running, before new ones are answered 503 (see the module's docstring)."""
    admission = Admission(max_waiting_requests)
    app = FastAPI(title="MoLink", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.admission = admission
    if api_key:
        app.add_middleware(_ApiKeyGuard, api_key=api_key)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail),
                     "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):  # a bug: still answer in OpenAI's shape
        logger.exception("unhandled error in the HTTP API")
        return error(500, f"internal error: {type(exc).__name__}", "internal_error")

    @app.get("/health")
    async def health():
        ready, detail = head.health()
        if not ready:
            return error(503, f"pipeline not ready: {detail}", "service_unavailable")
        return {"status": "ok", "pipeline": head.describe()}

    metrics = HeadMetrics(head)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model",
                                            "created": 0, "owned_by": "molink"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(head, admission, request, served_model_name, _parse_completion,
                            CompletionFormat)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(head, admission, request, served_model_name, _parse_chat,
                            ChatFormat)

    @app.post("/generate")
    async def generate(request: Request):
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            job = dataclasses.replace(_parse_completion(body, head), stream=False)
        except ValueError as exc:
            return _failure(exc)
        fmt = CompletionFormat(served_model_name, job)
        answer = await _answer(head, admission, job, fmt, request)
        if isinstance(answer, JSONResponse):
            return answer
        return {"text": answer["choices"][0]["text"]}

    return app


async def _serve(head: PipelineHead, admission: Admission, request: Request, model: str, parse,
                 fmt_class):
    """Body -> model check -> Job -> an answer (JSON or an event stream)."""
    body = await _json_body(request)
    if isinstance(body, JSONResponse):
        return body
    requested = body.get("model")
    if requested is not None and not isinstance(requested, str):
        return error(400, f"model must be a string, got {_show(requested)}", param="model")
    if requested is not None and requested != model:
        return error(404, f"model {requested!r} does not exist; this server serves {model!r}",
                     "not_found_error", "model")
    try:
        job = parse(body, head)
    except ValueError as exc:
        return _failure(exc)
    fmt = fmt_class(model, job)
    if job.stream:
        return await _start_stream(head, admission, job, fmt)
    return await _answer(head, admission, job, fmt, request)


# ---- authentication -------------------------------------------------------------------------


class _ApiKeyGuard:
    """ASGI middleware: /v1/* and /generate need ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _guarded(scope["path"]):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error(401, "missing or incorrect API key: send 'Authorization: "
                                      "Bearer <key>'", "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _guarded(path: str) -> bool:
    return path == "/generate" or path == "/v1" or path.startswith("/v1/")


# ---- parsing: body -> Job -------------------------------------------------------------------


async def _json_body(request: Request):
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return error(400, "request body is not valid JSON")
    if not isinstance(body, dict):
        return error(400, "request body must be a JSON object")
    return body


def _parse_completion(body: dict, head: PipelineHead) -> Job:
    _reject_unsupported(body, _UNSUPPORTED_COMPLETION)
    prompts = _prompts(body.get("prompt"), head)
    max_tokens = _optional_int(body, "max_tokens", low=1)
    if max_tokens is None:
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
    num_top = _optional_int(body, "logprobs", low=0, high=MAX_LOGPROBS)
    return _job(body, head, prompts, max_tokens, num_top)


def _parse_chat(body: dict, head: PipelineHead) -> Job:
    _reject_unsupported(body, _UNSUPPORTED_CHAT)
    text = _chat_prompt(_messages(body.get("messages")), head)
    prompts = [head.tokenizer.encode(text, add_special_tokens=False)]
    max_tokens = _optional_int(body, "max_completion_tokens", low=1)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", low=1)
    wants_logprobs = _optional_bool(body, "logprobs") or False
    num_top = _optional_int(body, "top_logprobs", low=0, high=MAX_LOGPROBS)
    if num_top is not None and not wants_logprobs:
        raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
    return _job(body, head, prompts, max_tokens, (num_top or 0) if wants_logprobs else None)


def _job(body: dict, head: PipelineHead, prompts: list[list[int]], max_tokens: int | None,
         num_top: int | None) -> Job:
    """The fields both endpoints share: n, stream, user and the sampling fields."""
    n = _optional_int(body, "n", low=1, high=MAX_N) or 1
    if n * len(prompts) > MAX_N:
        raise RequestError(f"n times the number of prompts must be at most {MAX_N}", "n")
    stream = _optional_bool(body, "stream") or False
    include_usage = _stream_options(body.get("stream_options"), stream)
    _optional_str(body, "user")
    for ids in prompts:
        _check_length(ids, max_tokens, head)
    values = {name: body[name] for name in _SAMPLING_FIELDS if body.get(name) is not None}
    for name, value in values.items():  # SamplingParams' math.isfinite overflows on these
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _HUGE_INT:
            raise RequestError(f"{name} is too large: {_show(value)}", name)
    for name in ("stop", "stop_token_ids"):  # SamplingParams checks the items, not the length
        if isinstance(values.get(name), list) and len(values[name]) > 1024:
            raise RequestError(f"{name} may hold at most 1024 items", name)
    _check_texts("stop", values.get("stop"))
    params = SamplingParams(max_tokens=max_tokens, logprobs=num_top, **values)
    seed = params.seed
    choice_params = [params if seed is None else params.replace(seed=seed + j) for j in range(n)]
    return Job(prompts, choice_params, stream, include_usage, num_top)


def _prompts(prompt, head: PipelineHead) -> list[list[int]]:
    """A string, a token-id list, or a non-empty list of either -> token ids per prompt."""
    if isinstance(prompt, str) or _is_token_ids(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or _is_token_ids(p) for p in prompt):
        items = prompt
    else:
        raise RequestError("prompt must be a non-empty string, a non-empty list of token ids, "
                           "or a non-empty list of either", "prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise RequestError("prompt must not be empty", "prompt")
            _check_texts("prompt", item)
            prompts.append(head.tokenizer.encode(item))
        else:
            vocab_size = head.arch.vocab_size
            if not all(0 <= t < vocab_size for t in item):
                raise RequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
            prompts.append(list(item))
    return prompts


def _is_token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _messages(messages) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects",
                           "messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object, got {_show(message)}", "messages")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise RequestError(f"messages[{i}].role must be a non-empty string", "messages")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", "messages")
        _check_texts("messages", [role, content])
        clean.append({"role": role, "content": content})
    return clean


def _chat_prompt(messages: list[dict[str, str]], head: PipelineHead) -> str:
    if not getattr(head.tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template", "messages")
    try:
        return head.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
    except (jinja2.TemplateError, ValueError) as exc:
        raise RequestError(f"the chat template rejected these messages: {exc}", "messages") from None


def _check_length(prompt_ids: list[int], max_tokens: int | None, head: PipelineHead) -> None:
    limit = head.max_model_len
    if not limit:  # not ready yet: the head answers PipelineNotReady
        return
    if len(prompt_ids) >= limit:
        raise RequestError(f"prompt is {len(prompt_ids)} tokens long, but the model length "
                           f"(max_model_len) is {limit}: the prompt must be shorter than that",
                           "prompt")
    if max_tokens is not None and len(prompt_ids) + max_tokens > limit:
        raise RequestError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) "
                           f"exceeds the model length (max_model_len) of {limit}", "max_tokens")


def _stream_options(options, stream: bool) -> bool:
    """-> include_usage."""
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object, got {_show(options)}",
                           "stream_options")
    return _optional_bool(options, "include_usage", "stream_options.include_usage") or False


def _reject_unsupported(body: dict, table: dict[str, tuple]) -> None:
    for name, allowed in table.items():
        if name in body and body[name] not in allowed:
            raise RequestError(f"{name} is not supported by this server", name)


def _optional_int(body: dict, name: str, *, low: int, high: int = _INT_LIMIT) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {_show(value)}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be in [{low}, {high}], got {_show(value)}", name)
    return value


def _optional_bool(body: dict, name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{param or name} must be a boolean, got {_show(value)}", param or name)
    return value


def _optional_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {_show(value)}", name)
    return value


def _check_texts(name: str, value) -> None:
    """Strings must be encodable (JSON allows lone surrogates; tokenizers choke on them)."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(f"{name} is not valid Unicode (it holds a lone surrogate)",
                                   name) from None


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _param_of(message: str) -> str | None:
    """SamplingParams' messages start with the field name."""
    name = message.split(" ", 1)[0]
    return name if name in _SAMPLING_FIELDS or name in ("max_tokens", "logprobs", "n") else None


# ---- admission control ----------------------------------------------------------------------


class Admission:
    """Bounds the requests waiting in the head (see the module's docstring).

    ``num_pending`` counts the choices admitted here but not yet handed to the head: between
    the check and the moment a pump calls ``head.generate`` other requests are checked, and
    the scheduler does not know about these yet. ``head.generate`` adds its request to the
    scheduler in its first step, with no await before it, and a pump hands over (decrements
    ``num_pending``) in that same step, so ``num_waiting + num_pending`` never skips a choice.
    """

    WINDOW_S = 60.0  # departures older than this no longer describe the current rate

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_waiting_requests must be a positive integer, got {limit!r}")
        self.limit = limit
        self.num_pending = 0
        self.num_rejected = 0  # over the app's life
        self._departures: collections.deque[float] = collections.deque(maxlen=256)

    def num_waiting(self, head: PipelineHead) -> int:
        scheduler = getattr(head, "scheduler", None)
        return (scheduler.num_waiting if scheduler is not None else 0) + self.num_pending

    def admit(self, head: PipelineHead, num_choices: int, n: int) -> int:
        """Count ``num_choices`` as pending, or raise; -> how many were counted.

        Nothing is counted while the head has no scheduler (not ready): ``head.generate``
        then answers PipelineNotReady, the usual 503.
        """
        if num_choices > self.limit:
            raise RequestError(f"n ({n}) times the number of prompts ({num_choices // n}) is "
                               f"{num_choices} choices, more than this server lets wait at once "
                               f"(max_waiting_requests = {self.limit}): such a request could "
                               "never be admitted; lower n or split the prompts", "n")
        if getattr(head, "scheduler", None) is None:
            return 0
        waiting = self.num_waiting(head)
        if waiting + num_choices > self.limit:
            self.num_rejected += 1
            raise ServerOverloaded(waiting, self.limit,
                                   self.retry_after(waiting + num_choices - self.limit))
        self.num_pending += num_choices
        return num_choices

    def departed(self) -> None:
        """A handed-over request left the head (finished, failed or aborted)."""
        self._departures.append(time.monotonic())

    def retry_after(self, excess: int) -> int:
        """Seconds until about ``excess`` requests have left the waiting queue.

        Waiting requests start as running ones leave, so the queue drains at the rate
        requests have been leaving the head over the last minute; without such departures
        the estimate is 1 s (a rejection is cheap). Between 1 and MAX_RETRY_AFTER_S.
        """
        now = time.monotonic()
        while self._departures and now - self._departures[0] > self.WINDOW_S:
            self._departures.popleft()
        if not self._departures:
            return 1
        rate = len(self._departures) / max(now - self._departures[0], 1.0)  # per second
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(excess / rate)))


# ---- running ------------------------------------------------------------------------------


async def _merged(head: PipelineHead, admission: Admission, job: Job,
                  request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Admit the request, then run every choice concurrently; yield (choice index, output) as
    they come. Admission is checked here, where every answer starts its choices, and raises
    ServerOverloaded (503) or RequestError (400) before anything starts.

    Leaving early cancels the pumps, which leaves the head's generators, which aborts the
    requests and frees their KV blocks.
    """
    choices = job.choices()
    unhanded = admission.admit(head, len(choices), job.n)
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ids: list[int], params: SamplingParams) -> None:
        nonlocal unhanded
        handed = unhanded > 0
        if handed:  # head.generate queues the request in this same step (no await before)
            unhanded -= 1
            admission.num_pending -= 1
        try:
            async for output in head.generate(ids, params, f"{request_id}-{index}"):
                queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))
        finally:
            if handed:
                admission.departed()

    tasks = [asyncio.create_task(pump(i, ids, params)) for i, (ids, params) in enumerate(choices)]
    try:
        num_running = len(tasks)
        while num_running:
            index, item = await queue.get()
            if item is None:
                num_running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        # A pump cancelled before its first step never runs: it never reaches the head.
        admission.num_pending -= unhanded
        unhanded = 0


def _failure(exc: Exception) -> JSONResponse:
    if isinstance(exc, ServerOverloaded):
        return error(503, str(exc), "service_unavailable",
                     headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, (PipelineNotReady, StageUnavailable)):
        return error(503, str(exc), "service_unavailable")
    return error(400, str(exc), param=getattr(exc, "param", None) or _param_of(str(exc)))


async def _answer(head: PipelineHead, admission: Admission, job: Job, fmt, request: Request):
    """The whole answer as JSON; a client that hangs up first aborts its requests."""
    collect = asyncio.create_task(_collect(head, admission, job, fmt.request_id))
    hang_up = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait((collect, hang_up), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hang_up.cancel()
        if not collect.done():  # cancelling it leaves _merged, which aborts the requests
            collect.cancel()
    if not collect.done() or collect.cancelled():
        return error(499, "client closed the request")  # nobody reads this
    try:
        finals = collect.result()
    except (*_SERVICE_ERRORS, ValueError) as exc:
        return _failure(exc)
    return fmt.answer([finals[i] for i in range(len(finals))])


async def _collect(head: PipelineHead, admission: Admission, job: Job,
                   request_id: str) -> dict[int, RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    async for index, output in _merged(head, admission, job, request_id):
        finals[index] = output
    return finals


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body has been read, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _start_stream(head: PipelineHead, admission: Admission, job: Job, fmt):
    """Wait for the first output before answering, so bad input (or an overloaded server) is
    an HTTP error, not an event."""
    merged = _merged(head, admission, job, fmt.request_id)
    try:
        first = await anext(merged)
    except (*_SERVICE_ERRORS, ValueError) as exc:
        await merged.aclose()
        return _failure(exc)
    return StreamingResponse(_events(merged, first, job, fmt), media_type="text/event-stream")


async def _events(merged, first: tuple[int, RequestOutput], job: Job, fmt) -> AsyncIterator[str]:
    finals: dict[int, RequestOutput] = {}
    try:
        for chunk in fmt.opening_chunks():
            yield _sse(chunk)
        index, output = first
        while True:
            finals[index] = output
            if (chunk := fmt.chunk(index, output)) is not None:
                yield _sse(chunk)
            try:
                index, output = await anext(merged)
            except StopAsyncIteration:
                break
        if job.include_usage:
            yield _sse(fmt.usage_chunk([finals[i] for i in sorted(finals)]))
    except (PipelineNotReady, StageUnavailable, ValueError) as exc:
        status = 503 if isinstance(exc, (PipelineNotReady, StageUnavailable)) else 400
        yield _sse(json.loads(_failure(exc).body) | {"status": status})
    finally:
        await merged.aclose()
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
