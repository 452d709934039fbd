"""Structured output and tool calls through the official ``openai`` client against a real
2-stage pipeline of the bundled model: ``molink serve`` (layers 0:3) + ``molink join``
(layers 3:6, where tokens are sampled, so the grammar's mask is applied in another process
than the head's). The model has random weights: only the grammar makes its output valid.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import molink
from tests.entrypoints.test_openai_api import API_KEY, Server, start_server, stop_all

MODEL_DIR = str(Path(molink.__file__).parent / "assets" / "default_model")
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "code": {"type": "string", "pattern": "^[a-z]{1,4}$"},
    },
    "required": ["ok", "n", "color", "code"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}}}
# Renders tools and tool turns, so the prompt shows they reached the template.
TEMPLATE = (
    "{%- if tools %}[tools {% for t in tools %}{{ t.function.name }} {% endfor %}]{% endif -%}"
    "{%- for m in messages -%}[{{ m.role }}]{{ m.content }}"
    "{%- for call in m.tool_calls or [] %}(call {{ call.function.name }}){% endfor %}"
    "{%- endfor -%}[assistant]")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "tools.jinja"
    template.write_text(TEMPLATE)
    procs: list[subprocess.Popen] = []
    try:
        url = start_server(MODEL_DIR, procs, ["3:"], "0:3", (
            "--api-key", API_KEY, "--max-model-len", "256", "--chat-template", str(template),
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"))
        yield Server(url, MODEL_DIR, os.path.basename(MODEL_DIR))
    finally:
        stop_all(procs)


def _check_schema(value) -> None:
    """SCHEMA, checked by hand (its every keyword)."""
    assert isinstance(value, dict) and set(value) == set(SCHEMA["required"]), value
    assert isinstance(value["ok"], bool)
    assert type(value["n"]) is int and 0 <= value["n"] <= 99, value
    assert value["color"] in ("red", "green", "blue"), value
    assert re.fullmatch("[a-z]{1,4}", value["code"]), value


def _chat(server: Server, **kwargs):
    kwargs.setdefault("messages", [{"role": "user", "content": "Answer."}])
    return server.client().chat.completions.create(model=server.model, **kwargs)


# ---- structured output ------------------------------------------------------------------------


def test_json_schema_output_always_validates(server):
    async def one(client, i: int):
        return await client.chat.completions.create(
            model=server.model, max_tokens=64, temperature=1.0, seed=i,
            messages=[{"role": "user", "content": f"prompt {i}: " + "xyz " * (i % 7)}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}})

    async def run_all():
        client = server.async_client()
        return await asyncio.gather(*(one(client, i) for i in range(50)))

    for answer in asyncio.run(run_all()):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        _check_schema(json.loads(choice.message.content))


def test_json_object_parses(server):
    # The model never closes an object by itself: a bias towards '"' (id 7) and '}' (id 98)
    # makes it end soon. Without the grammar the same bias gives no JSON at all.
    bias = {"7": 10, "98": 20}
    guided = _chat(server, max_tokens=40, temperature=0, logit_bias=bias,
                   response_format={"type": "json_object"})
    choice = guided.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict), choice.message.content
    free = _chat(server, max_tokens=40, temperature=0, logit_bias=bias)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)


def test_guided_choice_and_regex_on_completions(server):
    client = server.client()
    choices = ["alpha", "beta", "gamma delta"]
    for seed in range(4):
        text = client.completions.create(model=server.model, prompt="Pick:", max_tokens=16,
                                         seed=seed, extra_body={"guided_choice": choices})
        assert text.choices[0].text in choices
        assert text.choices[0].finish_reason == "stop"
        regex = r"[0-9]{3}-[a-c]{2}"
        text = client.completions.create(model=server.model, prompt="Code:", max_tokens=20,
                                         seed=seed, extra_body={"guided_regex": regex})
        assert re.fullmatch(regex, text.choices[0].text), text.choices[0].text


def test_bad_specs_are_400_naming_the_field(server):
    cases = [
        ({"response_format": {"type": "json_schema",
                               "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format"),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
    ]
    for body, field in cases:
        reply = server.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body})
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["error"]["param"] == field, (body, reply.text)
        assert field in reply.json()["error"]["message"], reply.text


# ---- tool calls -------------------------------------------------------------------------------


def _streamed_calls(server: Server, **kwargs) -> tuple[dict[int, dict], str | None, str]:
    """Streams a chat; -> (calls by index, finish reason, content)."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in _chat(server, stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        finish = choice.finish_reason or finish
        for entry in choice.delta.tool_calls or []:
            call = calls.setdefault(entry.index, {"id": entry.id, "name": None, "arguments": ""})
            if entry.function.name:
                call["name"] = entry.function.name
            call["arguments"] += entry.function.arguments or ""
    return calls, finish, content


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_call_round_trip(server, tool_choice):
    messages = [{"role": "user", "content": "What time is it?"}]
    answer = _chat(server, messages=messages, tools=[WEATHER, TIME], tool_choice=tool_choice,
                   max_tokens=60, temperature=0, parallel_tool_calls=False)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    expected = {"get_weather": ("city", ("Paris", "Oslo")), "get_time": ("zone", ("UTC", "CET"))}
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_time"
    key, values = expected[call.function.name]
    assert set(arguments) == {key} and arguments[key] in values

    calls, finish, content = _streamed_calls(
        server, messages=messages, tools=[WEATHER, TIME], tool_choice=tool_choice,
        max_tokens=60, temperature=0, parallel_tool_calls=False)
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], json.loads(calls[0]["arguments"])) == (call.function.name,
                                                                     arguments)

    followup = [*messages, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    second = _chat(server, messages=followup, tools=[WEATHER, TIME], tool_choice="none",
                   max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert second.choices[0].finish_reason == "length"
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content
    rendered = server.post("/tokenize", json={"messages": followup, "tools": [WEATHER]})
    assert rendered.status_code == 200, rendered.text


def test_tools_reach_the_template_and_auto_uses_the_parser(server):
    tokens = server.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]})
    assert tokens.status_code == 200
    answer = _chat(server, tools=[WEATHER], max_tokens=4, temperature=0,
                   extra_body={"ignore_eos": True})  # "auto": hermes reads the text
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "length"
    usage_with = answer.usage.prompt_tokens
    without = _chat(server, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert usage_with > without.usage.prompt_tokens  # "[tools get_weather ]" was rendered


def test_bad_tool_choices_are_400(server):
    cases = [({"tool_choice": {"type": "function", "function": {"name": "nope"}},
               "tools": [WEATHER]}, "tool_choice"),
             ({"tool_choice": "required"}, "tool_choice"),
             ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
             ({"tools": [{"type": "function", "function": {
                 "name": "f", "parameters": {"type": "nope"}}}], "tool_choice": "required"},
              "tools")]
    for body, field in cases:
        reply = server.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body})
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["error"]["param"] == field, (body, reply.text)
