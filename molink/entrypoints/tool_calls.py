"""ToolCalls: how one chat request's ``tools`` and ``tool_choice`` are honoured.

As vLLM does (``--enable-auto-tool-choice --tool-call-parser NAME``):

* ``"none"`` (the default without tools): tools reach the template, the text is content;
* ``"auto"`` (the default with tools): the model decides; its text is read by the server's
  parser (``tool_parsers``); a 400 when the server was started without
  ``--enable-auto-tool-choice``;
* ``"required"``: structured output forces a JSON array of ``{"name", "parameters"}``
  calls (one call with ``parallel_tool_calls: false``);
* ``{"type": "function", "function": {"name": ...}}``: structured output forces that
  function's arguments.

Forced choices work on any model, as the grammar writes the calls. Answers carry
``tool_calls`` (``id``, ``type: "function"``, ``function: {name, arguments}``), ``content``
None when only calls were made, and ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import dataclasses
import uuid

from molink.coordinator.prompts import RequestError
from molink.entrypoints.protocol import ChatCompletionRequest, NamedToolChoice
from molink.entrypoints.structured import checked
from molink.entrypoints.tool_parsers import (
    ArrayParser,
    NamedParser,
    ToolCall,
    ToolCallParser,
    parser_named,
)
from molink.sampling_params import StructuredOutputsParams

AUTO_NEEDS_FLAGS = ('"auto" tool choice requires --enable-auto-tool-choice and '
                    '--tool-call-parser to be set')


@dataclasses.dataclass(frozen=True)
class ToolCalls:
    parser: ToolCallParser
    structured: StructuredOutputsParams | None  # forced choices: the calls' grammar

    def answer_fields(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The message fields of a finished choice, and its finish reason."""
        content, calls = self.parser.split(text)
        if not calls:
            return {"content": text}, finish_reason
        message = {"content": content.strip() or None, "tool_calls": [
            {"id": new_call_id(), "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for call in calls]}
        return message, "tool_calls" if finish_reason == "stop" else finish_reason


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_of(request: ChatCompletionRequest, enable_auto: bool,
                  parser_name: str | None) -> ToolCalls | None:
    """The request's tool handling (None: its text is all content); RequestError if bad."""
    tools = request.tools or []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise RequestError(f"tools[{i}].type must be 'function', got {tool.type!r}", "tools")
    choice = request.tool_choice if request.tool_choice is not None else (
        "auto" if tools else "none")
    if choice == "none":
        return None
    if not tools:
        raise RequestError("tool_choice needs tools", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        return _named(tools, choice)
    if choice == "required":
        schema = _calls_schema(tools, request.parallel_tool_calls is not False)
        return ToolCalls(ArrayParser(), checked({"json": schema}, "tools"))
    if choice == "auto":
        if not enable_auto or parser_name is None:
            raise RequestError(AUTO_NEEDS_FLAGS, "tool_choice")
        return ToolCalls(parser_named(parser_name), None)
    raise RequestError("tool_choice must be 'none', 'auto', 'required' or a named function, "
                       f"got {choice!r}", "tool_choice")


def _named(tools, choice: NamedToolChoice) -> ToolCalls:
    if choice.type != "function":
        raise RequestError(f"tool_choice.type must be 'function', got {choice.type!r}",
                           "tool_choice")
    tool = next((t for t in tools if t.function.name == choice.function.name), None)
    if tool is None:
        raise RequestError(f"tool_choice names function {choice.function.name!r}, which is not "
                           "in tools", "tool_choice")
    schema = tool.function.parameters or {"type": "object"}
    return ToolCalls(NamedParser(tool.function.name), checked({"json": schema}, "tools"))


def _calls_schema(tools, parallel: bool) -> dict:
    """A JSON array of calls, each one of the tools with its parameters."""
    one_of = [{"type": "object",
               "properties": {"name": {"const": tool.function.name},
                              "parameters": tool.function.parameters or {"type": "object"}},
               "required": ["name", "parameters"], "additionalProperties": False}
              for tool in tools]
    schema = {"type": "array", "items": {"anyOf": one_of}, "minItems": 1}
    return schema | ({} if parallel else {"maxItems": 1})


class ToolCallStream:
    """One streamed choice's tool calls: each chunk's ``delta`` from the text so far."""

    def __init__(self, tools: ToolCalls) -> None:
        self.tools = tools
        self.sent_content = 0
        self.sent_arguments: list[int] = []  # per call started: argument chars sent
        self.ids: list[str] = []

    def delta(self, text: str, finished: bool) -> dict:
        content, calls = self.tools.parser.split(text, finished)
        delta: dict = {}
        if content[self.sent_content:] and (not calls or content.strip()):
            delta["content"] = content[self.sent_content:]
            self.sent_content = len(content)
        entries = [entry for index, call in enumerate(calls)
                   if (entry := self._call_delta(index, call)) is not None]
        if entries:
            delta["tool_calls"] = entries
        return delta

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def _call_delta(self, index: int, call: ToolCall) -> dict | None:
        if index == len(self.ids):  # a new call: its id and name, with its arguments so far
            self.ids.append(new_call_id())
            self.sent_arguments.append(len(call.arguments))
            return {"index": index, "id": self.ids[index], "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments}}
        fragment = call.arguments[self.sent_arguments[index]:]
        if not fragment:
            return None
        self.sent_arguments[index] = len(call.arguments)
        return {"index": index, "function": {"arguments": fragment}}

