"""A remote last stage stops and bans exactly the end-of-sequence ids the head's tokenizer
uses: they travel with each new request (the stage's own files may say otherwise)."""

from __future__ import annotations

import torch

from molink import SamplingParams
from molink.config import CacheConfig, ModelConfig
from molink.messages import BatchEntry, NewRequest, StepPlan
from molink.runtime.stage_executor import StageExecutor
from molink.transport.codec import decode_step, encode_step

PROMPT = [5, 17, 99, 23]


def _greedy_token(executor: StageExecutor, request_id: str, eos: tuple[int, ...],
                  min_tokens: int) -> int:
    params = SamplingParams(temperature=0, min_tokens=min_tokens)
    plan = StepPlan(0, [BatchEntry(request_id, 0, len(PROMPT), True)],
                    new_requests=[NewRequest(request_id, PROMPT, len(PROMPT), params, [0], eos)])
    # Across the wire, as to a remote stage.
    wire = decode_step(encode_step(plan)).plan
    assert wire.new_requests[0].eos_token_ids == eos
    return executor.execute(wire).sampled_token_ids[request_id]


def test_the_heads_eos_ids_reach_the_sampler(tiny_model_dir):
    torch.manual_seed(0)
    executor = StageExecutor(ModelConfig(model=str(tiny_model_dir("llama")), dtype="float32",
                                         device="cpu"), CacheConfig(block_size=8, num_blocks=8))
    assert not executor.eos_token_ids  # a stage process is given none of its own
    top = _greedy_token(executor, "a", (), min_tokens=0)
    # min_tokens bans end-of-sequence ids while active: only if the stage knows them.
    assert _greedy_token(executor, "b", (top,), min_tokens=0) == top
    banned = _greedy_token(executor, "c", (top,), min_tokens=2)
    assert banned != top
    assert _greedy_token(executor, "d", (), min_tokens=2) == top  # no ids: nothing banned
