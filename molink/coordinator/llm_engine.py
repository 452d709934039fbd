"""LLMEngine: the in-process engine loop, where the scheduler and the stages meet.

One ``step()`` is the whole algorithm::

    plan   = scheduler.schedule()          # what to compute (plain data)
    output = run plan through the stages   # hidden states stage to stage, tokens at the end
    done   = scheduler.update_from_output  # append tokens, check stop conditions
    texts  = detokenize, match stop strings

The stages here are ``StageExecutor`` objects chained in this process (one for a whole
model, or several consecutive layer ranges); remote stages plug in behind the same plan.
With a ``wire_compression``, the hidden states between chained stages make the same raw
round trip as on a compressed network hop, so this engine reproduces a compressed pipeline.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.frontend import Frontend
from molink.coordinator.output_processor import OutputProcessor
from molink.messages import WIRE_COMPRESSIONS, StepOutput, StepPlan
from molink.outputs import RequestOutput
from molink.runtime.stage_executor import StageExecutor
from molink.runtime.wire_tensor import from_raw, to_raw
from molink.sampling_params import SamplingParams
from molink.scheduler import Scheduler

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None,
                 stage_layers: list[tuple[int, int]] | None = None,
                 wire_compression: str = "none") -> None:
        """``wire_compression``: how hidden states cross between chained stages (one of
        ``WIRE_COMPRESSIONS``), as they would cross a network hop."""
        if wire_compression not in WIRE_COMPRESSIONS:
            raise ValueError(f"wire_compression must be one of {', '.join(WIRE_COMPRESSIONS)}, "
                             f"got {wire_compression!r}")
        self.wire_compression = wire_compression
        cache_config = cache_config or CacheConfig()
        scheduler_config = scheduler_config or SchedulerConfig()
        self.executors = self._make_executors(model_config, cache_config, stage_layers,
                                              scheduler_config.max_num_seqs)
        self.arch = self.executors[0].arch
        self.frontend = Frontend(model_config, self.arch)
        self.tokenizer = self.frontend.tokenizer
        self.eos_token_ids = self.frontend.eos_token_ids
        for executor in self.executors:
            executor.eos_token_ids = self.eos_token_ids
        num_blocks = min(e.num_blocks for e in self.executors)
        self.max_model_len = self.frontend.fit_kv_capacity(num_blocks * cache_config.block_size)
        self.scheduler_config = dataclasses.replace(
            scheduler_config, max_model_len=self.max_model_len,
            max_num_batched_tokens=max(scheduler_config.max_num_batched_tokens, 1))
        self.scheduler = Scheduler(self.scheduler_config, num_blocks, cache_config.block_size)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    # ---- public API ---------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams) -> str:
        """Validate and queue a request; returns its id. Raises ValueError on bad input."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        text, request = self.frontend.make_request(request_id, prompt, params)
        self.scheduler.add_request(request)
        self.output_processor.add(request, text)
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        for request in self.scheduler.abort_requests(request_ids):
            self.output_processor.discard(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Schedule, execute and post-process one step; returns outputs that changed."""
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        output = self.execute(plan)
        changed = self.scheduler.update_from_output(plan, output)
        return self.output_processor.process(changed, output, self.scheduler)

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run a plan through the chained stages."""
        hidden = None
        for index, executor in enumerate(self.executors):
            if index and hidden is not None and self.wire_compression != "none":
                # a compressed hop: [T, hidden] leaves as raw bytes
                raw = to_raw(hidden, self.wire_compression)
                hidden = from_raw(raw, executor.device, dtype=executor.dtype)
            hidden = executor.execute(plan, hidden)
        return hidden

    # ---- helpers ------------------------------------------------------------------------

    @staticmethod
    def _make_executors(model_config, cache_config, stage_layers,
                        max_num_seqs: int) -> list[StageExecutor]:
        if not stage_layers:
            return [StageExecutor(model_config, cache_config, max_num_seqs=max_num_seqs)]
        return [StageExecutor(model_config.replace(start_layer=start, end_layer=end), cache_config,
                              max_num_seqs=max_num_seqs)
                for start, end in stage_layers]
