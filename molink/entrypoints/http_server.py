"""The head's HTTP API (first cut): ``/health``, ``/v1/models``, ``/v1/completions``, ``/generate``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: invalid
input 400, unknown model 404, pipeline not ready or a stage lost 503. Streaming answers
are server-sent events. A client that disconnects aborts its request.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from molink.coordinator.pipeline_head import PipelineHead, PipelineNotReady, StageUnavailable
from molink.sampling_params import SamplingParams

MAX_BODY_BYTES = 4 * 1024 * 1024
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "min_tokens", "stop",
                    "stop_token_ids", "ignore_eos", "n")


def error(status: int, message: str, kind: str = "invalid_request_error",
          param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": kind, "param": param, "code": status}})


def create_app(head: PipelineHead, served_model_name: str) -> FastAPI:
    app = FastAPI(title="MoLink", docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health():
        ready, detail = head.health()
        if not ready:
            return error(503, f"pipeline not ready: {detail}", "service_unavailable")
        return {"status": "ok", "pipeline": head.describe()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model",
                                            "created": 0, "owned_by": "molink"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        if body.get("model", served_model_name) != served_model_name:
            return error(404, f"model {body.get('model')!r} does not exist; this server serves "
                              f"{served_model_name!r}", "not_found_error", "model")
        try:
            prompt = _prompt(body.get("prompt"))
            params = _sampling_params(body)
        except ValueError as exc:
            return error(400, str(exc))
        if body.get("stream"):
            return StreamingResponse(_stream(head, request, prompt, params, served_model_name),
                                     media_type="text/event-stream")
        return await _complete(head, prompt, params, served_model_name)

    @app.post("/generate")
    async def generate(request: Request):
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            params = _sampling_params(body)
            prompt = _prompt(body.get("prompt"))
        except ValueError as exc:
            return error(400, str(exc))
        answer = await _complete(head, prompt, params, served_model_name)
        if isinstance(answer, JSONResponse):
            return answer
        return {"text": answer["choices"][0]["text"]}

    return app


async def _json_body(request: Request):
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        return error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return error(400, "request body is not valid JSON")
    if not isinstance(body, dict):
        return error(400, "request body must be a JSON object")
    return body


def _prompt(prompt):
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ValueError("prompt must be a non-empty string or a list of token ids")


def _sampling_params(body: dict) -> SamplingParams:
    values = {name: body[name] for name in _SAMPLING_FIELDS if body.get(name) is not None}
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is not None:
        values["max_tokens"] = max_tokens
    if values.get("n", 1) != 1:
        raise ValueError("n must be 1 on this server for now")
    return SamplingParams(**values)


async def _complete(head: PipelineHead, prompt, params: SamplingParams, model: str):
    final = None
    try:
        async for final in head.generate(prompt, params):
            pass
    except (PipelineNotReady, StageUnavailable) as exc:
        return error(503, str(exc), "service_unavailable")
    except ValueError as exc:
        return error(400, str(exc))
    out = final.outputs[0]
    num_prompt = len(final.prompt_token_ids)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": out.text, "logprobs": None,
                         "finish_reason": _finish_reason(out.finish_reason)}],
            "usage": {"prompt_tokens": num_prompt, "completion_tokens": len(out.token_ids),
                      "total_tokens": num_prompt + len(out.token_ids)}}


async def _stream(head: PipelineHead, request: Request, prompt, params: SamplingParams,
                  model: str):
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    sent = 0
    try:
        async for output in head.generate(prompt, params):
            out = output.outputs[0]
            chunk = {"id": completion_id, "object": "text_completion", "created": int(time.time()),
                     "model": model, "choices": [{"index": 0, "text": out.text[sent:],
                                                  "logprobs": None,
                                                  "finish_reason": _finish_reason(out.finish_reason)}]}
            sent = len(out.text)
            yield f"data: {json.dumps(chunk)}\n\n"
    except (PipelineNotReady, StageUnavailable, ValueError) as exc:
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'service_unavailable'}})}\n\n"
    yield "data: [DONE]\n\n"


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)
