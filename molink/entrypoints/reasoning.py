"""ReasoningParser: a reasoning model's thinking, split from its answer (``reasoning_content``).

``molink serve --reasoning-parser qwen3|deepseek_r1`` (default: none, the text is all
``content``). Both models think between ``<think>`` and ``</think>``; as vLLM's parsers do:

* a leading ``<think>`` is dropped (DeepSeek-R1's and Qwen3.5's templates put it in the
  prompt, so the output often starts inside the thinking);
* text before ``</think>`` is ``reasoning_content``, text after it ``content`` (``None``
  when empty); with no ``</think>`` the whole text is reasoning (cut off while thinking);
* ``qwen3`` with ``chat_template_kwargs: {"enable_thinking": false}``: no thinking was asked
  for, so the whole text is ``content``.

It reads the text, not token ids, so it works whatever ids the tags have::

    text so far:  "<think>I should gre"          "<think>I should greet.</thi"   "...</think>Hi"
    reasoning:            "I should gre"                 "I should greet."        (complete)
    content:      None                           None (held: "</thi" may be the tag)  "Hi"

While a choice streams, a tail that may be the start of a tag is held back until the next
text shows what it is, so the streamed parts only ever grow and add up to the whole split.
"""

from __future__ import annotations

from typing import Any

PARSERS = ("qwen3", "deepseek_r1")
START, END = "<think>", "</think>"


class ReasoningParser:
    def __init__(self, thinking: bool = True) -> None:
        """``thinking``: False when the request turned thinking off (all text is content)."""
        self.thinking = thinking

    def split(self, text: str, finished: bool = True) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a choice's text so far."""
        if not self.thinking:
            return None, text
        body, stripped = text, text.lstrip()
        if stripped.startswith(START):
            body = stripped[len(START):]
        elif not finished and START.startswith(stripped):
            return "", None  # may yet become "<think>"
        reasoning, end, content = body.partition(END)
        if end:
            return reasoning, content or None
        if not finished:
            reasoning = reasoning[:len(reasoning) - _partial_tag(reasoning)]
        return reasoning, None


def _partial_tag(text: str) -> int:
    """Length of the longest tail of ``text`` that begins END (held back while streaming)."""
    for size in range(min(len(END) - 1, len(text)), 0, -1):
        if END.startswith(text[-size:]):
            return size
    return 0


def reasoning_parser(name: str | None,
                     template_kwargs: dict[str, Any] | None) -> ReasoningParser | None:
    """The parser for one request; None without ``--reasoning-parser``."""
    if name is None:
        return None
    if name not in PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r} (known: {', '.join(PARSERS)})")
    thinking = not (name == "qwen3" and (template_kwargs or {}).get("enable_thinking") is False)
    return ReasoningParser(thinking)
