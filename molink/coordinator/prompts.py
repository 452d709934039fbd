"""Prompts in, validated requests out: the one place user prompts are checked."""

from __future__ import annotations

import time

from molink.sampling_params import SamplingParams
from molink.scheduler import Request


def tokenize_prompt(tokenizer, prompt) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a string or a token-id list; ValueError otherwise."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must not be empty")
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def validate_prompt(token_ids: list[int], params: SamplingParams, vocab_size: int,
                    max_model_len: int) -> None:
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    if not token_ids:
        raise ValueError("prompt must not be empty")
    if len(token_ids) >= max_model_len:
        raise ValueError(
            f"prompt is {len(token_ids)} tokens long, but the model length (max_model_len) "
            f"is {max_model_len}: the prompt must be shorter than that"
        )
    for token in token_ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab_size}), got {token!r}")


def make_request(request_id: str, prompt, params: SamplingParams, *, tokenizer, vocab_size: int,
                 max_model_len: int, eos_token_ids: frozenset[int]) -> tuple[str | None, Request]:
    """Tokenize and validate ``prompt``; -> (prompt text or None, a new Request)."""
    text, token_ids = tokenize_prompt(tokenizer, prompt)
    validate_prompt(token_ids, params, vocab_size, max_model_len)
    request = Request(request_id, token_ids, params, eos_token_ids=eos_token_ids,
                      arrival_time=time.monotonic())
    return text, request
