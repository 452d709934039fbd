"""Chat templates: the one place chat messages become a prompt's text.

A model's template comes with its tokenizer (``tokenizer.load_tokenizer``); ``molink serve
--chat-template FILE|STRING`` replaces it (``load_chat_template``: a file's text, or the
literal Jinja string, compiled at startup so a bad template stops the server with a clear
error instead of failing every request). ``render_chat`` applies whichever template is in
force, as ``transformers`` does (sandboxed Jinja, never remote code), with the request's
``chat_template_kwargs`` (Qwen3's ``enable_thinking``...) as further template variables.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jinja2

from molink.coordinator.prompts import RequestError

logger = logging.getLogger(__name__)

# Arguments of ``apply_chat_template`` itself: never template variables from a request.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file path (its text) or a literal Jinja template; None: the
    tokenizer's own. ValueError, naming the option, when it is neither or does not compile."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--chat-template: cannot read {value!r}: {exc}") from None
        source = f"file {value!r}"
    elif any(mark in value for mark in "{}\n"):
        template, source = value, "the given string"
    else:
        raise ValueError(f"--chat-template {value!r} is not a file, nor a Jinja template "
                         "(a template holds '{{ ... }}' or '{% ... %}')")
    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template: {source} is not a valid Jinja template: "
                         f"{exc.message} (line {exc.lineno})") from None
    logger.info("chat template from %s replaces the tokenizer's", source)
    return template


def _compile(template: str) -> None:
    """Compile as ``transformers`` will (its extensions: loop controls, generation tags)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers: the plain sandbox, with loop controls
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
        return
    _compile_jinja_template(template)


def render_chat(tokenizer, messages: list[dict[str, Any]], *, template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                template_kwargs: dict[str, Any] | None = None,
                tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text of ``messages`` (dicts as templates expect them) and ``tools`` (the
    request's, as OpenAI's JSON). RequestError naming the field when the template, or these
    options, reject them."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template (start the server "
                           "with --chat-template)", "messages")
    if add_generation_prompt and continue_final_message:
        raise RequestError("add_generation_prompt and continue_final_message cannot both be "
                           "true", "continue_final_message")
    kwargs = dict(template_kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise RequestError(f"chat_template_kwargs may not set {', '.join(reserved)}: they are "
                           "request fields of their own", "chat_template_kwargs")
    if continue_final_message and messages[-1].get("role") != "assistant":
        raise RequestError("continue_final_message needs the last message to be the "
                           "assistant's", "continue_final_message")
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False, tools=tools, **kwargs)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        raise RequestError(f"the chat template rejected these messages: {exc}",
                           "messages") from None
