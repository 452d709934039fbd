"""Hostile request bodies against ``/v1/completions`` and ``/v1/chat/completions``.

The bodies are generated deterministically: every field set to every value of a hostile
table (wrong types, huge numbers, NaN, huge strings, Unicode edge cases, deep nesting), plus
whole bodies that are not JSON objects at all (empty, invalid UTF-8, lone surrogates, 10,000
levels of nesting). None may answer 5xx; every error is in OpenAI's shape; a normal request
still succeeds afterwards. Clients that hang up mid-stream must not leak KV blocks. The
server is one ``molink serve`` process serving every layer, with its API key from
``MOLINK_API_KEY`` and a KV cache of 16 blocks of 8 tokens: two requests of the full model
length (64 tokens, 8 blocks each) fill it, so a leak shows up as a request that never ends.
"""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from tests.entrypoints.test_openai_api import start_server, stop_all

API_KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BIG_STRING = "x" * 100_000
DEEP = 10_000
MAX_MODEL_LEN = 64

COMPLETION = {"prompt": "hi", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n",
                 "stop", "stop_token_ids", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_tokens", "ignore_eos", "logprobs", "stream",
                 "stream_options", "user", "logit_bias", "skip_special_tokens", "prompt_logprobs")
COMPLETION_FIELDS = COMMON_FIELDS + ("prompt", "echo", "suffix")
CHAT_FIELDS = COMMON_FIELDS + ("messages", "max_completion_tokens", "top_logprobs", "tools",
                               "response_format")

# Raw JSON text of each hostile value (raw, so NaN and 400-digit numbers can be written).
HOSTILE_VALUES = [
    "null", "true", "false", "-1", "0", "1.5", str(2**63), str(-2**63), "1" + "0" * 400,
    "1e308", "-1e999", "NaN", "Infinity", '"hot"', '""', "[]", "{}", '[1, "a", null]',
    '{"a": {"b": [1]}}', json.dumps("\u202eRTL\u200b\u200dzero-width\ufeff"),
    json.dumps("emoji \U0001F600\U0001F469\u200d\U0001F4BB"), '"\\ud800 lone"',
    '["\\udfff"]', json.dumps(BIG_STRING), "[" * 50 + "]" * 50,
    json.dumps(list(range(-3, 3))), json.dumps([2**40]),
]


def _with_field(base: dict, name: str, raw_value: str) -> bytes:
    others = {k: v for k, v in base.items() if k != name}
    text = json.dumps(others)[:-1]
    separator = ", " if others else ""
    return f'{text}{separator}"{name}": {raw_value}}}'.encode("utf-8", errors="surrogatepass")


def _whole_bodies() -> list[bytes]:
    return [
        b"", b" ", b"null", b"1", b'"a string"', b"[]", b"true", b"{", b'{"prompt": "hi"} trailing',
        b'{"prompt": "\xff\xfe invalid utf-8"}', b"\xff\xfe\xfd", b'\xef\xbb\xbf{"prompt": "bom"}',
        b'{"prompt": "\xed\xa0\x80 surrogate bytes"}', b'{"prompt": "\\ud800"}',
        b"[" * DEEP + b"]" * DEEP, b'{"a":' * DEEP + b"1" + b"}" * DEEP,
        b'{"prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"prompt": "hi", "prompt": 5, "max_tokens": 2}',
        b'{"max_tokens": 2, "prompt": ' + b"9" * 5000 + b"}",
        json.dumps({"prompt": list(range(20_000)), "max_tokens": 2}).encode(),
        json.dumps({"prompt": [[1, 2], [3]], "max_tokens": 2}).encode(),
        json.dumps({"prompt": ["a", [1]], "max_tokens": 2}).encode(),
        json.dumps({"prompt": [[]], "max_tokens": 2}).encode(),
        json.dumps({"prompt": ["a"] * 200, "max_tokens": 2}).encode(),
        json.dumps({"prompt": "hi", "n": 128, "max_tokens": 2, "seed": 2**63 - 1}).encode(),
        json.dumps({"prompt": "hi", "stop": ["s"] * 5000}).encode(),
        json.dumps({"prompt": "hi", "max_tokens": 2, "stream": True,
                    "stream_options": {"include_usage": "yes"}}).encode(),
        json.dumps({"messages": [{"role": "user", "content": BIG_STRING}]}).encode(),
        json.dumps({"messages": [{"role": 5, "content": "hi"}]}).encode(),
        json.dumps({"messages": [{"role": "", "content": "hi"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": None}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}
                   ).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi", "extra": {"x": 1}}],
                    "max_tokens": 2}).encode(),
        json.dumps({"messages": [{"role": "\u202e", "content": "\u200b"}], "max_tokens": 2}
                   ).encode(),
        json.dumps({"messages": ["hi"]}).encode(),
        json.dumps({"messages": [[{"role": "user", "content": "hi"}]]}).encode(),
    ]


def hostile_bodies(base: dict, fields: tuple[str, ...]) -> list[bytes]:
    bodies = [_with_field(base, name, value) for name in fields for value in HOSTILE_VALUES]
    return bodies + _whole_bodies()


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    procs: list[subprocess.Popen] = []
    try:
        yield start_server(str(tiny_model_dir("llama")), procs, [], "0:4",
                           ("--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "16"),
                           env={"MOLINK_API_KEY": API_KEY})
    finally:
        stop_all(procs)


def _check(response: httpx.Response, body: bytes) -> None:
    assert response.status_code < 500, (response.status_code, body[:200], response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, body[:200]
        assert error["code"] == response.status_code


def test_hostile_bodies_never_answer_5xx(url):
    targets = [("/v1/completions", hostile_bodies(COMPLETION, COMPLETION_FIELDS)),
               ("/v1/chat/completions", hostile_bodies(CHAT, CHAT_FIELDS))]
    num_sent, statuses = 0, set()
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        for path, bodies in targets:
            for body in bodies:
                response = client.post(path, content=body,
                                       headers={"Content-Type": "application/json"})
                _check(response, body)
                statuses.add(response.status_code)
                num_sent += 1
        for path, bodies in targets:  # without the key: 401 before any parsing
            for body in bodies[:10]:
                response = httpx.post(f"{url}{path}", content=body, timeout=60)
                assert response.status_code == 401
                _check(response, body)
        assert num_sent >= 400
        assert {200, 400, 404}.issubset(statuses)  # the table reaches past validation
        normal = client.post("/v1/completions", json={"prompt": "still alive", "max_tokens": 3,
                                                      "temperature": 0, "ignore_eos": True})
        assert normal.status_code == 200 and normal.json()["usage"]["completion_tokens"] == 3
        chat = client.post("/v1/chat/completions", json=CHAT)
        assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_clients_that_hang_up_free_their_kv_blocks(url):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2,
            "ignore_eos": True, "temperature": 0}  # no max_tokens: up to the model length
    for _ in range(6):  # 12 requests of 8 blocks each; the cache holds 2
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH,
                          timeout=30) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # one event, then hang up
    full = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=30,
                      json=body | {"stream": False})
    assert full.status_code == 200
    assert [c["finish_reason"] for c in full.json()["choices"]] == ["length", "length"]
    assert full.json()["usage"]["total_tokens"] == 2 * MAX_MODEL_LEN - full.json()["usage"][
        "prompt_tokens"]
