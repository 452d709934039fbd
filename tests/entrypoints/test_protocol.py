"""The request models at the HTTP edge, in-process against a stand-in head: validation errors
are 400s in OpenAI's shape naming the field (never FastAPI's 422), extra fields are
accepted, the API describes itself at ``/docs`` and ``/openapi.json``, and each request logs
one line when received and one when it ends (never its prompt text above DEBUG)."""

from __future__ import annotations

import asyncio
import json
import logging
import types

import httpx
import pytest
from transformers import AutoTokenizer

from molink.entrypoints.http_server import create_app
from molink.outputs import CompletionOutput, RequestOutput

API_KEY = "sk-protocol"
CHAT = [{"role": "user", "content": "hi"}]
SECRET_PROMPT = "my secret prompt text"


class OneTokenHead:
    """Stands in for PipelineHead: every request finishes at once with one token."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.arch = types.SimpleNamespace(vocab_size=len(tokenizer))
        self.max_model_len = 64
        self.listeners: list = []  # what HeadMetrics attaches to
        self.scheduler = types.SimpleNamespace(num_waiting=0)
        self.prompts: list[list[int]] = []

    async def generate(self, prompt, params, request_id=None):
        self.prompts.append(list(prompt))
        yield RequestOutput(request_id, None, list(prompt), [
            CompletionOutput(0, "x", [7], finish_reason="length")], finished=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))


def _post(app, path: str, body=None, *, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    # As JSON text, so a lone surrogate travels escaped as a real client would send it.
    return _request(app, "POST", path, key=key, content=json.dumps(body), **kwargs)


def _request(app, method: str, path: str, *, key: str | None = API_KEY,
             **kwargs) -> httpx.Response:
    async def send():
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     headers=headers) as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


def _assert_400(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert error["param"] == param and param in error["message"], error
    return error["message"]


def test_validation_errors_are_400_naming_the_field(tokenizer):
    app = create_app(OneTokenHead(tokenizer), "tiny", api_key=API_KEY)
    completion, chat = {"prompt": "hi"}, {"messages": CHAT}
    for body, param in [({"prompt": 5}, "prompt"), ({}, "prompt"), ({"prompt": []}, "prompt"),
                        (completion | {"n": "2"}, "n"), (completion | {"n": 0}, "n"),
                        (completion | {"temperature": "hot"}, "temperature"),
                        (completion | {"max_tokens": 1.5}, "max_tokens"),
                        (completion | {"stop": ["\ud800"]}, "stop"),
                        (completion | {"echo": True, "prompt_logprobs": -2}, "prompt_logprobs"),
                        (completion | {"stream_options": {"include_usage": "yes"}},
                         "stream_options"),
                        (completion | {"model": 5}, "model")]:
        _assert_400(_post(app, "/v1/completions", body), param)
    for body, param in [({"messages": [{"role": "user"}]}, "messages"),
                        ({"messages": ["hi"]}, "messages"),
                        (chat | {"tools": [{"type": "function"}]}, "tools"),
                        (chat | {"top_logprobs": 2}, "top_logprobs"),
                        (chat | {"logprobs": 1}, "logprobs")]:
        _assert_400(_post(app, "/v1/chat/completions", body), param)
    message = _assert_400(_post(app, "/v1/completions", {"prompt": "hi", "max_tokens": 64}),
                          "max_tokens")
    assert "max_model_len" in message
    assert "messages[0].content" in _assert_400(
        _post(app, "/v1/chat/completions", {"messages": [{"role": "user"}]}), "messages")


def test_fastapi_validation_errors_are_400_not_422(tokenizer):
    app = create_app(OneTokenHead(tokenizer), "tiny")

    @app.get("/probe")
    async def probe(count: int):  # FastAPI validates this one itself
        return {"count": count}

    assert _request(app, "GET", "/probe", params={"count": 3}).json() == {"count": 3}
    _assert_400(_request(app, "GET", "/probe", params={"count": "many"}), "count")


def test_extra_fields_from_real_clients_are_accepted(tokenizer):
    head = OneTokenHead(tokenizer)
    app = create_app(head, "tiny", api_key=API_KEY)
    extras = {"user": "someone", "metadata": {"a": 1}, "store": False, "service_tier": "auto",
              "guided_json": None, "echo": False, "logit_bias": {}}
    answer = _post(app, "/v1/completions", {"prompt": "hi"} | extras)
    assert answer.status_code == 200, answer.text
    chat = _post(app, "/v1/chat/completions", {"messages": [CHAT[0] | {"name": "me"}],
                                                "parallel_tool_calls": True, "tools": []})
    assert chat.status_code == 200, chat.text
    assert head.prompts[0] == tokenizer.encode("hi")


def test_the_api_describes_itself_without_the_key(tokenizer):
    app = create_app(OneTokenHead(tokenizer), "tiny", api_key=API_KEY)
    schema = _request(app, "GET", "/openapi.json", key=None)
    assert schema.status_code == 200
    document = schema.json()
    components = document["components"]["schemas"]
    assert {"prompt", "max_tokens", "temperature"} <= set(components["CompletionRequest"][
        "properties"])
    assert "messages" in components["ChatCompletionRequest"]["properties"]
    assert "ChatMessage" in components  # nested models resolve
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    docs = _request(app, "GET", "/docs", key=None)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert _post(app, "/v1/completions", {"prompt": "hi"}, key=None).status_code == 401


def test_each_request_logs_a_line_when_received_and_when_finished(tokenizer, caplog):
    body = {"prompt": SECRET_PROMPT, "max_tokens": 3, "temperature": 0.5}
    with caplog.at_level(logging.INFO, logger="molink.entrypoints.request_log"):
        answer = _post(create_app(OneTokenHead(tokenizer), "tiny"), "/v1/completions", body)
    assert answer.status_code == 200
    request_id = answer.json()["id"]
    lines = [r.getMessage() for r in caplog.records if r.name == "molink.entrypoints.request_log"]
    num_tokens = len(tokenizer.encode(SECRET_PROMPT))
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"received request {request_id}: prompt tokens [{num_tokens}]")
    assert "max_tokens=3" in lines[0] and "temperature=0.5" in lines[0]
    assert lines[1] == f"finished request {request_id}: 1 completion tokens, finish reasons length"
    assert all(SECRET_PROMPT not in line for line in lines)

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="molink.entrypoints.request_log"):
        quiet = create_app(OneTokenHead(tokenizer), "tiny", log_requests=False)
        assert _post(quiet, "/v1/completions", body).status_code == 200
    assert not [r for r in caplog.records if r.name == "molink.entrypoints.request_log"]
