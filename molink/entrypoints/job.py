"""Job: one validated OpenAI request, as the head runs it (token ids per prompt, one
SamplingParams per choice, what to report).

A request with ``n`` choices (or several prompts) runs one head request per choice::

    choice index = prompt index * n + j        seed of choice j = seed + j (when seeded)

With ``best_of`` (> n), ``best_of`` choices run per prompt and the ``n`` of highest
cumulative logprob are answered (``Job.best``), as vLLM did; their logprobs are computed
for that, and reported only when asked for.

Every prompt is checked by ``coordinator.prompts.validate_prompt`` (the checks every engine
applies) before any choice starts, so a bad prompt is a 400 and nothing runs.
"""

from __future__ import annotations

import dataclasses
import sys

from molink.coordinator.chat_template import render_chat
from molink.coordinator.prompts import RequestError, tokenize_prompt, validate_prompt
from molink.entrypoints.api_options import ApiOptions
from molink.entrypoints.chat_messages import template_messages
from molink.entrypoints.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from molink.entrypoints.structured import structured_outputs
from molink.entrypoints.tool_calls import ToolCalls, tool_calls_of
from molink.outputs import RequestOutput
from molink.sampling_params import MAX_N, SamplingParams, StructuredOutputsParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclasses.dataclass(frozen=True)
class Job:
    prompt_ids: list[list[int]]  # token ids of each prompt
    choice_params: list[SamplingParams]  # best_of (else n) of them, n == 1 each; per prompt
    stream: bool
    include_usage: bool
    num_top_logprobs: int | None  # None: no logprobs reported
    best_n: int | None = None  # best_of > n: how many of each prompt's choices are answered
    echo_texts: list[str] | None = None  # /v1/completions with echo: each prompt's text
    # echo with logprobs: each prompt's first token's text (the logprobs of the prompt's
    # tokens come first; the first token has none, and its text from here)
    echo_first_tokens: list[str] | None = None
    num_prompt_logprobs: int | None = None  # the request asked for them: answers carry them
    tool_calls: ToolCalls | None = None  # chat with tools: how calls are forced and read
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:N" (return_tokens_as_token_ids)

    @property
    def n(self) -> int:
        """Choices answered per prompt."""
        return self.best_n or len(self.choice_params)

    def choices(self) -> list[tuple[list[int], SamplingParams]]:
        return [(ids, params) for ids in self.prompt_ids for params in self.choice_params]

    def best(self, finals: list[RequestOutput]) -> list[RequestOutput]:
        """The answered outputs, from every choice's final output (in choice order)."""
        if self.best_n is None:
            return finals
        per_prompt = len(self.choice_params)
        best = []
        for start in range(0, len(finals), per_prompt):
            ranked = sorted(finals[start:start + per_prompt], key=_cumulative_logprob,
                            reverse=True)
            best += ranked[:self.best_n]
        return best


def _cumulative_logprob(output: RequestOutput) -> float:
    return output.outputs[0].cumulative_logprob or 0.0


def completion_job(request: CompletionRequest, head) -> Job:
    items = request.prompt if _is_prompt_list(request.prompt) else [request.prompt]
    tokenized = [tokenize_prompt(head.tokenizer, item) for item in items]
    prompts = [ids for _, ids in tokenized]
    max_tokens = request.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
    job = _job(request, head, prompts, max_tokens, request.logprobs)
    if not request.echo:
        return job
    texts = [text if text is not None else head.tokenizer.decode(ids) for text, ids in tokenized]
    job = dataclasses.replace(job, echo_texts=texts)
    if request.logprobs is None:
        return job
    num_top = max(request.logprobs, request.prompt_logprobs or 0)
    return dataclasses.replace(
        job, echo_first_tokens=[head.tokenizer.decode(ids[:1]) for ids in prompts],
        choice_params=[p.replace(prompt_logprobs=num_top) for p in job.choice_params])


def chat_job(request: ChatCompletionRequest, head, options: ApiOptions | None = None) -> Job:
    options = options or ApiOptions()
    tools = tool_calls_of(request, options.enable_auto_tool_choice, options.tool_call_parser)
    forced = tools.structured if tools is not None else None
    if forced is not None and structured_outputs(request) is not None:
        raise RequestError("a forced tool_choice cannot be combined with response_format or "
                           "guided_* fields", "tool_choice")
    text = chat_prompt(request, head.tokenizer, options.chat_template)
    prompts = [head.tokenizer.encode(text, add_special_tokens=False)]
    if request.top_logprobs is not None and not request.logprobs:
        raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
    num_top = (request.top_logprobs or 0) if request.logprobs else None
    job = _job(request, head, prompts, request.max_completion_tokens or request.max_tokens,
               num_top, forced)
    return dataclasses.replace(job, tool_calls=tools)


def _job(request: SamplingFields, head, prompts: list[list[int]], max_tokens: int | None,
         num_top: int | None, structured: StructuredOutputsParams | None = None) -> Job:
    n, best_of = _choice_counts(request, len(prompts))
    stream = bool(request.stream)
    if request.stream_options is not None and not stream:
        raise RequestError("stream_options is only allowed when stream is true", "stream_options")
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    # best_of ranks choices by their cumulative logprob: the sampler computes it with logprobs.
    logprobs = num_top if best_of == n or num_top is not None else 0
    params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                            structured_outputs=structured or structured_outputs(request),
                            **request.sampling_values())
    # Before the pipeline is ready the model length is unknown (0): the length checks
    # wait, and the head answers "not ready".
    max_model_len = head.max_model_len or sys.maxsize
    for ids in prompts:
        validate_prompt(ids, params, head.arch.vocab_size, max_model_len,
                        max_tokens_must_fit=True)
    seed = params.seed
    choice_params = [params if seed is None else params.replace(seed=seed + j)
                     for j in range(best_of)]
    return Job(prompts, choice_params, stream, include_usage, num_top,
               best_n=n if best_of > n else None,
               tokens_as_ids=bool(request.return_tokens_as_token_ids),
               num_prompt_logprobs=request.prompt_logprobs)


def _choice_counts(request: SamplingFields, num_prompts: int) -> tuple[int, int]:
    """(n, best_of): choices answered and choices run, per prompt."""
    n = request.n or 1
    best_of = n if request.best_of is None else request.best_of
    if best_of < n:
        raise RequestError(f"best_of must be greater than or equal to n, got n={n} and "
                           f"best_of={best_of}", "best_of")
    if best_of > n and request.stream:
        raise RequestError("best_of greater than n is not supported when streaming (the best "
                           "choices are known only at the end)", "best_of")
    if best_of * num_prompts > MAX_N:
        name = "n" if request.best_of is None else "best_of"
        raise RequestError(f"{name} times the number of prompts must be at most {MAX_N}", name)
    return n, best_of


def _is_prompt_list(prompt) -> bool:
    """A list of prompts (strings or token-id lists), not one prompt of token ids."""
    return isinstance(prompt, list) and not isinstance(prompt[0], int)


def chat_prompt(request, tokenizer, chat_template: str | None = None) -> str:
    """The prompt text of a request with chat ``messages`` (``ChatCompletionRequest`` or
    ``TokenizeRequest``): its messages and template options, ``chat_template`` (the
    server's ``--chat-template``) or else the tokenizer's."""
    add_generation_prompt = request.add_generation_prompt
    return render_chat(
        tokenizer, template_messages(request.messages), template=chat_template,
        add_generation_prompt=True if add_generation_prompt is None else add_generation_prompt,
        continue_final_message=bool(request.continue_final_message),
        template_kwargs=request.chat_template_kwargs,
        tools=[tool.model_dump(exclude_none=True) for tool in getattr(request, "tools", None) or []]
        or None)
