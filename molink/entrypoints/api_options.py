"""ApiOptions: how the HTTP API renders chats, splits reasoning and answers browsers (CORS).

``molink serve`` options, parsed and checked once at startup (``api_options``): a bad
``--chat-template`` stops the server before the model loads, with one clear line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from molink.coordinator.chat_template import load_chat_template
from molink.entrypoints.reasoning import PARSERS
from molink.entrypoints.tool_parsers import PARSERS as PARSERS_OF_TOOLS


@dataclasses.dataclass(frozen=True)
class ApiOptions:
    chat_template: str | None = None  # replaces the tokenizer's (the template's text)
    reasoning_parser: str | None = None  # one of reasoning.PARSERS; None: no split
    allowed_origins: tuple[str, ...] = ()  # empty: no CORS headers at all
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    enable_auto_tool_choice: bool = False  # tool_choice "auto": parse the model's tool calls
    tool_call_parser: str | None = None  # one of tool_parsers.PARSERS


def add_api_arguments(parser) -> None:
    parser.add_argument("--chat-template", default=None, metavar="FILE|STRING",
                        help="chat template replacing the tokenizer's: a Jinja file, or the "
                             "template itself (default: the tokenizer's own)")
    parser.add_argument("--reasoning-parser", default=None, choices=PARSERS,
                        help="return a reasoning model's <think>...</think> text as "
                             "reasoning_content, apart from content (default: none, all text "
                             "is content)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="tool_choice 'auto': read tool calls from the model's text with "
                             "--tool-call-parser (default: off, 'auto' with tools is a 400)")
    parser.add_argument("--tool-call-parser", default=None, choices=PARSERS_OF_TOOLS,
                        help="how the model writes tool calls: hermes (<tool_call>{...}"
                             "</tool_call>, Qwen2.5/Qwen3) or llama3_json (Llama 3.x JSON) "
                             "(default: none)")
    parser.add_argument("--allowed-origins", default=None, type=_names, metavar="LIST",
                        help="browser origins allowed by CORS, comma-separated or a JSON list, "
                             "'*' for any (default: none, no CORS headers are sent)")
    parser.add_argument("--allowed-methods", default="*", type=_names, metavar="LIST",
                        help="HTTP methods allowed by CORS (with --allowed-origins)")
    parser.add_argument("--allowed-headers", default="*", type=_names, metavar="LIST",
                        help="request headers allowed by CORS (with --allowed-origins)")
    parser.add_argument("--allow-credentials", action="store_true",
                        help="CORS: allow credentials (cookies, Authorization) from the allowed "
                             "origins (default: not allowed)")


def api_options(args) -> ApiOptions:
    """The options of parsed ``args``; ValueError naming the option when one is bad."""
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser "
                         f"({' or '.join(PARSERS_OF_TOOLS)})")
    return ApiOptions(
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        chat_template=load_chat_template(args.chat_template),
        reasoning_parser=args.reasoning_parser,
        allowed_origins=_as_tuple(args.allowed_origins or ()),
        allowed_methods=_as_tuple(args.allowed_methods), allowed_headers=_as_tuple(args.allowed_headers),
        allow_credentials=args.allow_credentials)


def _as_tuple(value) -> tuple[str, ...]:
    """argparse gives the default as written ("*"), a given value through ``_names``."""
    return _names(value) if isinstance(value, str) else tuple(value)


def _names(text: str) -> tuple[str, ...]:
    """argparse type: ``a,b`` or ``["a", "b"]`` (vLLM's form) -> ("a", "b")."""
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a JSON list: {text!r}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise argparse.ArgumentTypeError(f"must be a list of strings, got {text!r}")
    else:
        names = text.split(",")
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"must name at least one, got {text!r}")
    return tuple(names)
