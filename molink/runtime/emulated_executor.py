"""EmulatedExecutor: a stage whose layers' math is replaced by waiting what a profile says.

Same plans in, same-shaped activations out (the model's real hidden size and dtype), so
the scheduler, transport, link scheduling and micro-batching run for real at GPU speed on
machines without GPUs. The model comes from its ``config.json`` alone (no weights). The
last stage returns deterministic pseudo-tokens that are never an end-of-sequence token,
so requests never end early.
"""

from __future__ import annotations

import hashlib
import time

import torch

from molink.messages import StepOutput, StepPlan
from molink.model.loader import load_config, resolve_dtype
from molink.runtime.device_profile import DeviceProfile

DEFAULT_EMULATED_BLOCKS = 65536  # a profile that says nothing of memory

_SPIN_S = 0.002  # sleep until this close to the deadline, then spin: millisecond precision


class EmulatedExecutor:
    def __init__(self, model_dir: str, start_layer: int, end_layer: int | None,
                 profile: DeviceProfile, *, dtype: str = "auto", block_size: int = 16,
                 num_blocks: int = DEFAULT_EMULATED_BLOCKS) -> None:
        self.arch = load_config(model_dir).arch
        self.start_layer = start_layer
        self.end_layer = self.arch.num_layers if end_layer is None else end_layer
        self.num_layers = self.end_layer - self.start_layer
        self.is_first, self.is_last = start_layer == 0, self.end_layer == self.arch.num_layers
        self.device = torch.device("cpu")
        self.dtype = resolve_dtype(dtype, self.arch, self.device)
        self.profile = profile
        self.block_size, self.num_blocks = block_size, num_blocks
        self.num_tokens: dict[str, int] = {}  # tokens known per request (for context length)
        # What each request stops at (the head sends its EOS ids with the request): the
        # pseudo tokens avoid them, so emulated requests run their full length.
        self.stop_ids: dict[str, frozenset[int]] = {}
        self.last_step_ms = 0.0

    def reset(self) -> None:
        self.num_tokens.clear()
        self.stop_ids.clear()

    def predicted_ms(self, plan: StepPlan) -> float:
        """The profile's time for the plan: its layers, and the LM head for every token it
        samples when this stage is the last."""
        decode = [e for e in plan.batch if e.num_tokens == 1]
        prefill_tokens = sum(e.num_tokens for e in plan.batch if e.num_tokens > 1)
        context = sum(e.start + 1 for e in decode)
        sampled = sum(e.sample for e in plan.batch) if self.is_last else 0
        return self.profile.step_ms(self.num_layers, len(decode), prefill_tokens, context,
                                    sampled)

    def execute(self, plan: StepPlan, hidden_states=None):
        for request_id in plan.freed_request_ids:
            self.num_tokens.pop(request_id, None)
            self.stop_ids.pop(request_id, None)
        for new in plan.new_requests:
            self.num_tokens[new.request_id] = len(new.token_ids)
            self.stop_ids[new.request_id] = frozenset(new.eos_token_ids)
        for cached in plan.cached_requests:
            self.num_tokens[cached.request_id] += len(cached.new_token_ids)
        start = time.perf_counter()
        _wait_until(start + self.predicted_ms(plan) / 1e3)
        self.last_step_ms = (time.perf_counter() - start) * 1e3
        if not self.is_last:
            return torch.zeros(plan.num_tokens, self.arch.hidden_size, dtype=self.dtype)
        output = StepOutput(plan.step_id, microbatch_id=plan.microbatch_id)
        for entry in plan.batch:
            if entry.sample:
                output.sampled_token_ids[entry.request_id] = self._pseudo_token(
                    entry.request_id, entry.start + entry.num_tokens)
        return output

    def _pseudo_token(self, request_id: str, position: int) -> int:
        digest = hashlib.blake2b(f"{request_id}:{position}".encode(), digest_size=8).digest()
        token = int.from_bytes(digest, "little") % self.arch.vocab_size
        stop_ids = self.stop_ids.get(request_id, frozenset())
        while token in stop_ids:
            token = (token + 1) % self.arch.vocab_size
        return token


def _wait_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > _SPIN_S:
        time.sleep(remaining - _SPIN_S)
    while time.perf_counter() < deadline:
        pass
