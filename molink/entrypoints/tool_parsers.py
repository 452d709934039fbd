"""Tool-call parsers: a model's text so far -> its content and the tool calls in it.

``--tool-call-parser`` (with ``--enable-auto-tool-choice``), as vLLM's parsers of the same
names read what the models write:

* ``hermes`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>``, any number; the text before the first one is content;
* ``llama3_json`` (Llama 3.x): a text that starts with ``{`` (after an optional
  ``<|python_tag|>``) is ``{"name": ..., "parameters": {...}}``, several joined by ``;``.

Two more read what a forced ``tool_choice`` makes the grammar produce (``tool_calls``):
``ArrayParser`` (``"required"``: a JSON array of ``{"name", "parameters"}``) and
``NamedParser`` (one named function: the text is its arguments).

Parsers read the whole text each time, so streaming is a diff of two readings (``ToolCall``
fields only grow): a call is reported once its name is complete, its arguments' JSON text
as far as it has come; a tail that may start a marker is held back from the content::

    text:       'Sure<tool_c'    'Sure<tool_call>{"name": "f", "arguments": {"ci'
    content:    'Sure'           'Sure'
    calls:      []               [ToolCall("f", '{"ci', done=False)]
"""

from __future__ import annotations

import dataclasses
import json

PARSERS = ("hermes", "llama3_json")
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments (so far, while not done)
    done: bool


class ToolCallParser:
    def split(self, text: str, finished: bool = True) -> tuple[str, list[ToolCall]]:
        """(content, tool calls) of a choice's text so far."""
        raise NotImplementedError


class HermesParser(ToolCallParser):
    START, END = "<tool_call>", "</tool_call>"

    def split(self, text: str, finished: bool = True) -> tuple[str, list[ToolCall]]:
        content, marker, rest = text.partition(self.START)
        if not marker:
            return (text if finished else text[:len(text) - _partial(text, self.START)]), []
        calls = []
        for part in (marker + rest).split(self.START)[1:]:
            body = part.split(self.END)[0]
            call = _read_call(body, body.find("{"))
            if call is None:
                break
            calls.append(call)
        if finished and not all(call.done for call in calls):
            return text, []  # a broken call: the text stays content, as vLLM does
        return content, calls


class Llama3JsonParser(ToolCallParser):
    TAG = "<|python_tag|>"

    def split(self, text: str, finished: bool = True) -> tuple[str, list[ToolCall]]:
        body = text.lstrip()
        body = body[len(self.TAG):].lstrip() if body.startswith(self.TAG) else body
        if not finished and (not body or self.TAG.startswith(body)):
            return "", []  # may yet become a tag or a call
        if not body.startswith("{"):
            return text, []
        return _joined_calls(text, body, 0, ";", finished)


class ArrayParser(ToolCallParser):
    """``tool_choice: "required"``: the grammar makes a JSON array of calls."""

    def split(self, text: str, finished: bool = True) -> tuple[str, list[ToolCall]]:
        start = text.find("[")
        return ("", []) if start < 0 else _joined_calls(text, text, start + 1, ",", finished)


class NamedParser(ToolCallParser):
    """A named ``tool_choice``: the grammar makes the function's arguments, nothing else."""

    def __init__(self, name: str) -> None:
        self.name = name

    def split(self, text: str, finished: bool = True) -> tuple[str, list[ToolCall]]:
        arguments = text.strip()
        if not arguments and not finished:
            return "", []
        return "", [ToolCall(self.name, arguments, finished)]


def parser_named(name: str) -> ToolCallParser:
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    raise ValueError(f"unknown tool call parser {name!r} (known: {', '.join(PARSERS)})")


def _joined_calls(text: str, body: str, start: int, separator: str,
                  finished: bool) -> tuple[str, list[ToolCall]]:
    """Calls written as JSON objects from ``body[start:]``, joined by ``separator``."""
    calls: list[ToolCall] = []
    i = start
    while (i := _skip_space(body, i)) < len(body) and body[i] == "{":
        call = _read_call(body, i)
        if call is None:
            break
        calls.append(call)
        end = _value_end(body, i)
        if end is None:
            break
        i = _skip_space(body, end)
        if i >= len(body) or body[i] != separator:
            break
        i += 1
    if finished and (not calls or not all(call.done for call in calls)):
        return text, []
    return "", calls


def _read_call(text: str, start: int) -> ToolCall | None:
    """The call written as a JSON object at ``text[start]``; None until its name is complete."""
    if start < 0:
        return None
    fields, end = _scan_object(text, start)
    name_span = fields.get("name")
    if name_span is None or name_span[1] is None:
        return None
    name = json.loads(text[name_span[0]:name_span[1]])
    if not isinstance(name, str):
        return None
    key = next((k for k in ARGUMENT_KEYS if k in fields), None)
    if key is None:
        return ToolCall(name, "{}" if end is not None else "", end is not None)
    value_start, value_end = fields[key]
    if value_end is None:  # still being written: only an object's text so far is certain
        partial = text[value_start:] if text[value_start] == "{" else ""
        return ToolCall(name, partial, False)
    return ToolCall(name, text[value_start:value_end], end is not None)


# ---- a small JSON scanner: where values end, in text that may stop anywhere -------------------


def _scan_object(text: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The top-level fields of the object at ``text[i] == "{"``: key -> (value start, value
    end or None while incomplete), and the object's end (None while incomplete)."""
    fields: dict[str, tuple[int, int | None]] = {}
    i += 1
    while True:
        i = _skip_space(text, i)
        if i >= len(text):
            return fields, None
        if text[i] == "}":
            return fields, i + 1
        key_end = _string_end(text, i) if text[i] == '"' else None
        colon = _skip_space(text, key_end) if key_end is not None else len(text)
        if colon >= len(text) or text[colon] != ":":
            return fields, None
        value_start = _skip_space(text, colon + 1)
        if value_start >= len(text):
            return fields, None
        value_end = _value_end(text, value_start)
        fields[json.loads(text[i:key_end])] = (value_start, value_end)
        if value_end is None:
            return fields, None
        i = _skip_space(text, value_end)
        if i < len(text) and text[i] == ",":
            i += 1


def _value_end(text: str, i: int) -> int | None:
    """Index just after the JSON value starting at ``text[i]``; None if it is incomplete."""
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] not in "{[":
        end = i
        while end < len(text) and text[end] not in ",}] \t\r\n;":
            end += 1
        return end if end < len(text) else None
    depth, j = 0, i
    while j < len(text):
        char = text[j]
        if char == '"':
            j = _string_end(text, j)
            if j is None:
                return None
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def _string_end(text: str, i: int) -> int | None:
    """Index just after the string whose opening quote is ``text[i]``; None if unclosed."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _partial(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that begins ``marker`` (held back)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
