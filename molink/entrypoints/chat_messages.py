"""Chat messages as clients send them -> the dicts chat templates expect.

Clients (Open WebUI, LibreChat, LangChain, the OpenAI Agents SDK) send more than
``{role, content: str}``; as vLLM does:

* ``content`` as a list of parts: the text parts, joined by newlines in order (vLLM's
  "string" content format); any other part (``image_url``, ``input_audio``, ...) is a 400
  naming its type and the message, as this server reads text only;
* ``content: null`` on an assistant turn (one that carries ``tool_calls``): ``""``;
* ``tool_calls``: each call's ``function.arguments`` JSON text is parsed into a dict, as
  Llama-3.1's and Qwen2.5's templates render it with ``tojson`` (Qwen3's takes either);
* ``tool`` messages' ``tool_call_id`` and any message's ``name`` are passed through.
"""

from __future__ import annotations

import json
from typing import Any

from molink.coordinator.prompts import RequestError
from molink.entrypoints.protocol import ChatMessage, ContentPart, ToolCall


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as chat templates take them; RequestError naming the message otherwise."""
    return [_template_message(i, message) for i, message in enumerate(messages)]


def _template_message(index: int, message: ChatMessage) -> dict[str, Any]:
    where = f"messages[{index}]"
    result: dict[str, Any] = {"role": message.role, "content": _content(where, message)}
    if message.name is not None:
        result["name"] = message.name
    if message.tool_calls:
        if message.role != "assistant":
            raise RequestError(f"{where}.tool_calls is only allowed on assistant messages, "
                               f"not on role {message.role!r}", "messages")
        result["tool_calls"] = [_tool_call(f"{where}.tool_calls[{j}]", call)
                                for j, call in enumerate(message.tool_calls)]
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    return result


def _content(where: str, message: ChatMessage) -> str:
    content = message.content
    if content is None:
        if message.role != "assistant":
            raise RequestError(f"{where}.content is required for role {message.role!r} "
                               "(only an assistant message may have null content)", "messages")
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(_text(f"{where}.content[{j}]", part) for j, part in enumerate(content))


def _text(where: str, part: ContentPart) -> str:
    if part.type != "text":
        raise RequestError(f"{where}: content part type {part.type!r} is not supported by this "
                           "server (only 'text' parts are)", "messages")
    if part.text is None:
        raise RequestError(f"{where}.text is required for a 'text' part", "messages")
    return part.text


def _tool_call(where: str, call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except (ValueError, RecursionError):  # not JSON, or nested too deep
        raise RequestError(f"{where}.function.arguments must be JSON text (an object), got "
                           f"{call.function.arguments[:60]!r}", "messages") from None
    if not isinstance(arguments, dict):
        raise RequestError(f"{where}.function.arguments must be a JSON object, got "
                           f"{type(arguments).__name__}", "messages")
    result: dict[str, Any] = {"type": call.type or "function",
                              "function": {"name": call.function.name, "arguments": arguments}}
    if call.id is not None:
        result["id"] = call.id
    return result
