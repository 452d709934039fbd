"""StageExecutor: runs the head's plans on one stage's layer range.

It keeps, per request, the token ids and block table it was told about (full data once,
then deltas), turns each ``StepPlan`` into tensors, runs its model, and returns either the
hidden states for the next stage or, on the last stage, the sampled tokens. It never
decides anything: batching, block ids and preemption all come from the plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from molink.config import CacheConfig, ModelConfig
from molink.messages import StepOutput, StepPlan
from molink.model.loader import load_model
from molink.runtime.guided import GuidedDecoding, GuidedMatcher
from molink.runtime.kv_cache import (
    allocate_kv_cache,
    default_kv_budget_bytes,
    num_blocks_for_budget,
)
from molink.runtime.logprobs import prompt_logprobs
from molink.runtime.sampler import Sampler, SamplingRequestState
from molink.runtime.state_cache import StateCache, state_layers_of
from molink.runtime.step_inputs import StepInputs, build_step_inputs
from molink.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _RequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    eos_token_ids: frozenset[int]
    guided: GuidedMatcher | None = None  # last stage, structured output: made on first sample


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError:
            raise ValueError(f"device {name!r} is not a valid device name") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class StageExecutor:
    """One stage: a model for ``[start_layer, end_layer)``, its KV cache, and (last stage) a sampler."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 eos_token_ids: frozenset[int] = frozenset(), max_num_seqs: int = 256) -> None:
        """``max_num_seqs``: most requests the head runs at once (one state slot each)."""
        self.device = resolve_device(model_config.device)
        torch.manual_seed(model_config.seed)
        self.model, self.loaded = load_model(model_config.model, model_config.start_layer,
                                             model_config.end_layer, model_config.dtype,
                                             self.device, model_config.quantization)
        self.dtype = next(self.model.parameters()).dtype
        self.block_size = cache_config.block_size
        layers = self.model.attention_layers()
        self.num_blocks = self._choose_num_blocks(layers, model_config, cache_config, max_num_seqs)
        self.kv_caches = allocate_kv_cache(layers, self.num_blocks, self.block_size, self.dtype,
                                           self.device)
        state_layers = state_layers_of(self.model)  # recurrent state replaces KV (Mamba)
        self.state_cache = (StateCache(state_layers, max_num_seqs, self.dtype, self.device)
                            if state_layers else None)
        self.is_first, self.is_last = self.model.is_first, self.model.is_last
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sampler = Sampler(seed=model_config.seed) if self.is_last else None
        self.guided = (GuidedDecoding(model_config.tokenizer or model_config.model,
                                      self.arch.vocab_size) if self.is_last else None)
        self.requests: dict[str, _RequestState] = {}

    def _choose_num_blocks(self, layers, model_config: ModelConfig, cache_config: CacheConfig,
                           max_num_seqs: int) -> int:
        """KV blocks this stage holds: as asked, else what the memory budget allows, but
        never more than ``max_num_seqs`` requests of the full model length can use."""
        if cache_config.num_blocks:
            return cache_config.num_blocks
        max_len = model_config.max_model_len or self.arch.max_position_embeddings
        useful = max_num_seqs * -(-max_len // self.block_size)
        if not layers:
            # No attention layers (e.g. Mamba): a block costs no memory here and is only the
            # head scheduler's bookkeeping, so report enough for max_num_seqs requests.
            return useful
        budget = (cache_config.kv_cache_memory_bytes
                  or default_kv_budget_bytes(self.device, cache_config.gpu_memory_utilization))
        return min(useful, num_blocks_for_budget(layers, self.block_size, self.dtype, budget))

    @property
    def start_layer(self) -> int:
        return self.model.start_layer

    @property
    def end_layer(self) -> int:
        return self.model.end_layer

    @property
    def arch(self):
        return self.loaded.arch

    @torch.inference_mode()
    def execute(self, plan: StepPlan,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor | StepOutput:
        """Run one step. Non-last stages return ``[T, hidden]``; the last returns a StepOutput."""
        self._apply_plan_deltas(plan)
        if not plan.batch:
            return StepOutput(step_id=plan.step_id) if self.is_last else hidden_states
        inputs = self._prepare(plan)
        hidden = self.model(inputs.positions, inputs.meta, input_ids=inputs.input_ids,
                            hidden_states=hidden_states)  # [T, hidden]
        if not self.is_last:
            return hidden
        return self._sample(plan, inputs, hidden)

    def reset(self) -> None:
        """Forget every request (the head restarted them after a failure elsewhere)."""
        for request_id in list(self.requests):
            self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        if self.state_cache is not None:
            self.state_cache.free(request_id)

    def _apply_plan_deltas(self, plan: StepPlan) -> None:
        for request_id in plan.freed_request_ids:
            self._drop(request_id)
        for new in plan.new_requests:
            if self.state_cache is not None:
                self.state_cache.assign(new.request_id)
            self.requests[new.request_id] = _RequestState(
                token_ids=list(new.token_ids), num_prompt_tokens=new.num_prompt_tokens,
                sampling_params=new.sampling_params, block_ids=list(new.block_ids),
                eos_token_ids=frozenset(new.eos_token_ids) or self.eos_token_ids)
        for cached in plan.cached_requests:
            state = self.requests[cached.request_id]
            state.token_ids.extend(cached.new_token_ids)
            state.block_ids.extend(cached.new_block_ids)

    def _prepare(self, plan: StepPlan) -> StepInputs:
        token_ids = {e.request_id: self.requests[e.request_id].token_ids for e in plan.batch}
        block_ids = {e.request_id: self.requests[e.request_id].block_ids for e in plan.batch}
        state_slots = None if self.state_cache is None else {
            e.request_id: self.state_cache.slot_of(e.request_id) for e in plan.batch}
        return build_step_inputs(plan.batch, token_ids, block_ids, self.block_size, self.device,
                                 with_input_ids=self.is_first, state_slots=state_slots)

    def _sample(self, plan: StepPlan, inputs: StepInputs, hidden: torch.Tensor) -> StepOutput:
        output = StepOutput(step_id=plan.step_id, microbatch_id=plan.microbatch_id)
        self._prompt_logprobs(plan, hidden, output)
        if not inputs.sample_request_ids:
            return output
        logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [S, vocab]
        states = [self._sampling_state(rid) for rid in inputs.sample_request_ids]
        result = self.sampler(logits, states)
        for rid, token, logprobs in zip(inputs.sample_request_ids, result.token_ids,
                                        result.logprobs):
            output.sampled_token_ids[rid] = token
            if logprobs is not None:
                output.logprobs[rid] = logprobs
        return output

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor, output: StepOutput) -> None:
        """For requests that asked: each row predicts the token after it; rows whose next
        token is still in the prompt give that prompt token's logprobs."""
        row = 0
        for entry in plan.batch:
            state = self.requests[entry.request_id]
            num_top = state.sampling_params.prompt_logprobs
            count = min(entry.num_tokens, state.num_prompt_tokens - 1 - entry.start)
            if num_top is not None and count > 0:
                first = entry.start + 1
                output.prompt_logprobs[entry.request_id] = prompt_logprobs(
                    self.model.compute_logits, hidden[row:row + count],
                    state.token_ids[first:first + count], num_top, first)
            row += entry.num_tokens

    def _sampling_state(self, request_id: str) -> SamplingRequestState:
        state = self.requests[request_id]
        output_token_ids = state.token_ids[state.num_prompt_tokens:]
        structured = state.sampling_params.structured_outputs
        if structured is not None and state.guided is None:
            state.guided = self.guided.matcher(structured, state.eos_token_ids)
        if state.guided is not None:
            state.guided.advance(output_token_ids)
        return SamplingRequestState(
            params=state.sampling_params,
            prompt_token_ids=state.token_ids[:state.num_prompt_tokens],
            output_token_ids=output_token_ids,
            eos_token_ids=state.eos_token_ids,
            guided=state.guided,
        )
