"""The tool-call parsers on scripted texts, whole and streamed in fragments."""

from __future__ import annotations

import json

import pytest

from molink.entrypoints.tool_calls import ToolCalls, ToolCallStream
from molink.entrypoints.tool_parsers import (
    ArrayParser,
    HermesParser,
    Llama3JsonParser,
    NamedParser,
)

HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
          '"days": [1, 2], "note": "a \\"}\\" brace"}}\n</tool_call>\n<tool_call>\n'
          '{"name": "get_time", "arguments": {}}\n</tool_call>')
LLAMA = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
         '{"name": "get_time", "parameters": {"zone": "UTC"}}')
ARRAY = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'


def _streamed(parser, text: str, step: int) -> tuple[str, dict[int, dict]]:
    """Feeds ``text`` in fragments of ``step`` characters; -> (content, calls by index)."""
    stream = ToolCallStream(ToolCalls(parser, None))
    content, calls = "", {}
    for end in [*range(step, len(text), step), len(text)]:
        delta = stream.delta(text[:end], end == len(text))
        content += delta.get("content", "")
        for entry in delta.get("tool_calls", []):
            call = calls.setdefault(entry["index"], {"name": None, "arguments": ""})
            if "id" in entry:
                assert call["name"] is None and entry["type"] == "function"
                call["name"], call["id"] = entry["function"]["name"], entry["id"]
            call["arguments"] += entry["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_hermes_whole_and_streamed(step):
    content, calls = HermesParser().split(HERMES)
    assert content == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": [1, 2], "note": 'a "}" brace'}),
        ("get_time", {})]
    streamed_content, streamed = _streamed(HermesParser(), HERMES, step)
    assert streamed_content.strip() == "Let me check."
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
        (c.name, c.arguments) for c in calls]


def test_hermes_holds_back_a_partial_marker_and_keeps_plain_text():
    assert HermesParser().split("Hi <tool_c", finished=False) == ("Hi ", [])
    assert HermesParser().split("Hi <tool_c") == ("Hi <tool_c", [])
    broken = 'x<tool_call>{"name": "f", "arguments": {"a": '
    assert HermesParser().split(broken) == (broken, [])  # unfinished call: content


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_llama3_json_whole_and_streamed(step):
    content, calls = Llama3JsonParser().split(LLAMA)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "UTC"})]
    streamed_content, streamed = _streamed(Llama3JsonParser(), LLAMA, step)
    assert streamed_content == ""
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
        (c.name, c.arguments) for c in calls]
    assert Llama3JsonParser().split("The answer is 4.") == ("The answer is 4.", [])
    assert Llama3JsonParser().split("<|python", finished=False) == ("", [])


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_forced_parsers(step):
    _, calls = ArrayParser().split(ARRAY)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    _, streamed = _streamed(ArrayParser(), ARRAY, step)
    assert [json.loads(c["arguments"]) for c in streamed.values()] == [{"city": "Paris"}, {}]
    _, streamed = _streamed(NamedParser("f"), '{"city": "Oslo"}', step)
    assert streamed == {0: {"name": "f", "arguments": '{"city": "Oslo"}', "id": streamed[0]["id"]}}


def test_answer_fields_shape():
    tools = ToolCalls(HermesParser(), None)
    message, reason = tools.answer_fields(HERMES.split("Let me check.\n")[1], "stop")
    assert reason == "tool_calls" and message["content"] is None
    first = message["tool_calls"][0]
    assert first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"]["name"] == "get_weather"
    assert json.loads(first["function"]["arguments"])["city"] == "Paris"
    assert tools.answer_fields("no calls", "length") == ({"content": "no calls"}, "length")
