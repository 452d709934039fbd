"""Job: one validated OpenAI request, as the head runs it (token ids per prompt, one
SamplingParams per choice, what to report).

A request with ``n`` choices (or several prompts) runs one head request per choice::

    choice index = prompt index * n + j        seed of choice j = seed + j (when seeded)

Every prompt is checked by ``coordinator.prompts.validate_prompt`` (the checks every engine
applies) before any choice starts, so a bad prompt is a 400 and nothing runs.
"""

from __future__ import annotations

import dataclasses
import sys

import jinja2

from molink.coordinator.prompts import RequestError, tokenize_prompt, validate_prompt
from molink.entrypoints.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from molink.sampling_params import MAX_N, SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclasses.dataclass(frozen=True)
class Job:
    prompt_ids: list[list[int]]  # token ids of each prompt
    choice_params: list[SamplingParams]  # n of them, n == 1 each; choice j of every prompt
    stream: bool
    include_usage: bool
    num_top_logprobs: int | None  # None: no logprobs reported

    @property
    def n(self) -> int:
        return len(self.choice_params)

    def choices(self) -> list[tuple[list[int], SamplingParams]]:
        return [(ids, params) for ids in self.prompt_ids for params in self.choice_params]


def completion_job(request: CompletionRequest, head) -> Job:
    items = request.prompt if _is_prompt_list(request.prompt) else [request.prompt]
    prompts = [tokenize_prompt(head.tokenizer, item)[1] for item in items]
    max_tokens = request.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
    return _job(request, head, prompts, max_tokens, request.logprobs)


def chat_job(request: ChatCompletionRequest, head) -> Job:
    text = _chat_prompt([{"role": m.role, "content": m.content} for m in request.messages],
                        head.tokenizer)
    prompts = [head.tokenizer.encode(text, add_special_tokens=False)]
    if request.top_logprobs is not None and not request.logprobs:
        raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
    num_top = (request.top_logprobs or 0) if request.logprobs else None
    return _job(request, head, prompts, request.max_completion_tokens or request.max_tokens,
                num_top)


def _job(request: SamplingFields, head, prompts: list[list[int]], max_tokens: int | None,
         num_top: int | None) -> Job:
    n = request.n or 1
    if n * len(prompts) > MAX_N:
        raise RequestError(f"n times the number of prompts must be at most {MAX_N}", "n")
    stream = bool(request.stream)
    if request.stream_options is not None and not stream:
        raise RequestError("stream_options is only allowed when stream is true", "stream_options")
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    params = SamplingParams(max_tokens=max_tokens, logprobs=num_top,
                            **request.sampling_values())
    # Before the pipeline is ready the model length is unknown (0): the length checks
    # wait, and the head answers "not ready".
    max_model_len = head.max_model_len or sys.maxsize
    for ids in prompts:
        validate_prompt(ids, params, head.arch.vocab_size, max_model_len,
                        max_tokens_must_fit=True)
    seed = params.seed
    choice_params = [params if seed is None else params.replace(seed=seed + j) for j in range(n)]
    return Job(prompts, choice_params, stream, include_usage, num_top)


def _is_prompt_list(prompt) -> bool:
    """A list of prompts (strings or token-id lists), not one prompt of token ids."""
    return isinstance(prompt, list) and not isinstance(prompt[0], int)


def _chat_prompt(messages: list[dict[str, str]], tokenizer) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template", "messages")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (jinja2.TemplateError, ValueError) as exc:
        raise RequestError(f"the chat template rejected these messages: {exc}",
                           "messages") from None
