"""LLMEngine: the in-process engine loop, where the scheduler and the stages meet.

One ``step()`` is the whole algorithm::

    plan   = scheduler.schedule()          # what to compute (plain data)
    output = run plan through the stages   # hidden states stage to stage, tokens at the end
    done   = scheduler.update_from_output  # append tokens, check stop conditions
    texts  = detokenize, match stop strings

The stages here are ``StageExecutor`` objects chained in this process (one for a whole
model, or several consecutive layer ranges); remote stages plug in behind the same plan.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass

from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.detokenizer import IncrementalDetokenizer, StopStringMatcher
from molink.coordinator.tokenizer import eos_token_ids, load_tokenizer
from molink.messages import StepOutput, StepPlan
from molink.outputs import CompletionOutput, Logprob, RequestOutput
from molink.runtime.stage_executor import StageExecutor
from molink.sampling_params import SamplingParams
from molink.scheduler import Request, Scheduler

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    """The engine's view of one request: text so far, logprobs, and what it has processed."""

    request: Request
    prompt: str | None
    detokenizer: IncrementalDetokenizer | None
    stop_matcher: StopStringMatcher
    text: str = ""
    num_processed_tokens: int = 0
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None


class LLMEngine:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None,
                 stage_layers: list[tuple[int, int]] | None = None) -> None:
        cache_config = cache_config or CacheConfig()
        scheduler_config = scheduler_config or SchedulerConfig()
        self.executors = self._make_executors(model_config, cache_config, stage_layers)
        self.tokenizer = load_tokenizer(model_config.tokenizer or model_config.model)
        first = self.executors[0]
        self.arch = first.arch
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.arch.eos_token_ids,
                                           model_config.model)
        for executor in self.executors:
            executor.eos_token_ids = self.eos_token_ids
        num_blocks = min(e.num_blocks for e in self.executors)
        self.max_model_len = self._max_model_len(model_config, num_blocks * cache_config.block_size)
        self.scheduler_config = dataclasses.replace(
            scheduler_config, max_model_len=self.max_model_len,
            max_num_batched_tokens=max(scheduler_config.max_num_batched_tokens, 1))
        self.scheduler = Scheduler(self.scheduler_config, num_blocks, cache_config.block_size)
        self.tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()

    # ---- public API ---------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams) -> str:
        """Validate and queue a request; returns its id. Raises ValueError on bad input."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        text, token_ids = self._tokenize(prompt)
        self._validate_prompt(token_ids, params)
        request = Request(request_id, token_ids, params, eos_token_ids=self.eos_token_ids,
                          arrival_time=time.monotonic())
        self.scheduler.add_request(request)
        self.tracked[request_id] = _Tracked(
            request=request, prompt=text,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, token_ids, skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens),
            stop_matcher=StopStringMatcher(params.stop_strings, params.include_stop_str_in_output),
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
        )
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        for request in self.scheduler.abort_requests(request_ids):
            self.tracked.pop(request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Schedule, execute and post-process one step; returns outputs that changed."""
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        output = self.execute(plan)
        changed = self.scheduler.update_from_output(plan, output)
        return [self._process(request, output) for request in changed
                if request.request_id in self.tracked]

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run a plan through the chained stages."""
        hidden = None
        for executor in self.executors:
            hidden = executor.execute(plan, hidden)
        return hidden

    # ---- helpers ------------------------------------------------------------------------

    @staticmethod
    def _make_executors(model_config, cache_config, stage_layers) -> list[StageExecutor]:
        if not stage_layers:
            return [StageExecutor(model_config, cache_config)]
        return [StageExecutor(model_config.replace(start_layer=start, end_layer=end), cache_config)
                for start, end in stage_layers]

    def _max_model_len(self, model_config: ModelConfig, kv_capacity_tokens: int) -> int:
        limit = model_config.max_model_len or self.arch.max_position_embeddings
        if limit > kv_capacity_tokens:
            logger.warning("max_model_len %d exceeds the KV cache capacity; using %d tokens",
                           limit, kv_capacity_tokens)
        return max(2, min(limit, kv_capacity_tokens))

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.arch.vocab_size
        for token in token_ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}), got {token!r}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens long, but the model length (max_model_len) "
                f"is {self.max_model_len}: the prompt must be shorter than that"
            )
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")

    def _process(self, request: Request, output: StepOutput) -> RequestOutput:
        tracked = self.tracked[request.request_id]
        new_tokens = request.output_token_ids[tracked.num_processed_tokens:]
        tracked.num_processed_tokens = len(request.output_token_ids)
        if new_tokens:
            self._record_logprobs(tracked, output)
            piece = tracked.detokenizer.add_tokens(new_tokens)
            emit, stop = tracked.stop_matcher.feed(piece)
            tracked.text += emit
            if stop is not None and not request.is_finished:
                self.scheduler.finish_request(request.request_id, "stop", stop)
        if request.is_finished:
            if not isinstance(request.stop_reason, str):  # no stop string matched: release the tail
                emit, _ = tracked.stop_matcher.feed(tracked.detokenizer.flush())
                tracked.text += emit + tracked.stop_matcher.flush()
            del self.tracked[request.request_id]
        return self._request_output(tracked)

    def _record_logprobs(self, tracked: _Tracked, output: StepOutput) -> None:
        if tracked.logprobs is None:
            return
        lp = output.logprobs.get(tracked.request.request_id)
        if lp is None:
            return
        entry = {token: Logprob(value, rank=i + 1, decoded_token=self._decode_one(token))
                 for i, (token, value) in enumerate(lp.top)}
        entry[lp.token_id] = Logprob(lp.logprob, rank=lp.rank,
                                     decoded_token=self._decode_one(lp.token_id))
        tracked.logprobs.append(entry)
        tracked.cumulative_logprob += lp.logprob

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    @staticmethod
    def _request_output(tracked: _Tracked) -> RequestOutput:
        request = tracked.request
        completion = CompletionOutput(
            index=0, text=tracked.text, token_ids=list(request.output_token_ids),
            cumulative_logprob=tracked.cumulative_logprob,
            logprobs=list(tracked.logprobs) if tracked.logprobs is not None else None,
            finish_reason=request.finish_reason, stop_reason=request.stop_reason)
        return RequestOutput(request_id=request.request_id, prompt=tracked.prompt,
                             prompt_token_ids=list(request.prompt_token_ids),
                             outputs=[completion], finished=request.is_finished)
