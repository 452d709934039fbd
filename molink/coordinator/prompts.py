"""Prompts in, validated requests out: the one place a user's prompt is checked.

``make_request`` runs these checks for every engine; the HTTP API runs the same
``validate_prompt`` on each prompt of a request before any of its choices starts (so a bad
second prompt fails the whole request, not half of it). The length rule itself lives with
the ``Request`` (``check_prompt_length``), where the scheduler applies it too.
"""

from __future__ import annotations

import time

from molink.sampling_params import SamplingParams
from molink.scheduler import Request
from molink.scheduler.request import check_prompt_length


class RequestError(ValueError):
    """Bad user input; ``param`` names the offending field (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def tokenize_prompt(tokenizer, prompt) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a string or a token-id list; ValueError otherwise."""
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt must not be empty", "prompt")
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    raise RequestError("prompt must be a string or a list of token ids, got "
                       f"{type(prompt).__name__}", "prompt")


def validate_prompt(token_ids: list[int], params: SamplingParams, vocab_size: int,
                    max_model_len: int, *, max_tokens_must_fit: bool = False) -> None:
    """RequestError unless ``token_ids`` can run with ``params``. ``max_tokens_must_fit``
    (the HTTP API, as OpenAI's): prompt + max_tokens must fit in ``max_model_len``;
    otherwise a request simply stops there with finish reason "length"."""
    if not isinstance(params, SamplingParams):  # a ValueError, as for every bad input here
        raise ValueError(  # noqa: TRY004
            f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    try:
        check_prompt_length(len(token_ids), max_model_len)
    except ValueError as exc:
        raise RequestError(str(exc), "prompt") from None
    for token in token_ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise RequestError(f"prompt_token_ids must be integers in [0, {vocab_size}), "
                               f"got {token!r}", "prompt")
    for token in params.logit_bias or ():
        if token >= vocab_size:
            raise RequestError(f"logit_bias token ids must be in [0, {vocab_size}), got {token}",
                               "logit_bias")
    max_tokens = params.max_tokens
    if max_tokens_must_fit and max_tokens is not None \
            and len(token_ids) + max_tokens > max_model_len:
        raise RequestError(f"the prompt ({len(token_ids)} tokens) plus max_tokens ({max_tokens}) "
                           f"exceeds the model length (max_model_len) of {max_model_len}",
                           "max_tokens")


def make_request(request_id: str, prompt, params: SamplingParams, *, tokenizer, vocab_size: int,
                 max_model_len: int, eos_token_ids: frozenset[int]) -> tuple[str | None, Request]:
    """Tokenize and validate ``prompt``; -> (prompt text or None, a new Request)."""
    text, token_ids = tokenize_prompt(tokenizer, prompt)
    validate_prompt(token_ids, params, vocab_size, max_model_len)
    request = Request(request_id, token_ids, params, eos_token_ids=eos_token_ids,
                      arrival_time=time.monotonic())
    return text, request
