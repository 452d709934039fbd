"""Pipelines of separate processes produce exactly the tokens of the single-process engine,
which in turn equal ``transformers`` greedy generation."""

from __future__ import annotations

import asyncio

import pytest
import torch

from molink import LLM, SamplingParams
from tests.coordinator.pipeline_harness import generate_all, pipeline
from tests.model.arch_checks import make_prompts
from tests.model_factory import load_hf

NUM_REQUESTS = 16
LENGTHS = tuple(3 + (i * 7) % 37 for i in range(NUM_REQUESTS))  # mixed prompt lengths
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    cache = {}

    def get(arch):
        if arch not in cache:
            directory = tiny_model_dir(arch)
            prompts = make_prompts(512, LENGTHS, seed=99)
            llm = LLM(model=str(directory), dtype="float32", device="cpu", block_size=8)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS)
            tokens = [o.outputs[0].token_ids for o in outs]
            assert tokens == _transformers_greedy(directory, prompts)
            cache[arch] = (directory, prompts, tokens)
        return cache[arch]

    return get


def _transformers_greedy(directory, prompts) -> list[list[int]]:
    model = load_hf(directory)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=PARAMS.max_tokens,
                               do_sample=False, pad_token_id=3)[0, len(p):].tolist()
                for p in prompts]


TOPOLOGIES = {
    "1-stage": ((0, 4), []),
    "2-stage": ((0, 2), ["2:4"]),
    "3-stage": ((0, 1), ["1:3", "3:"]),
    "headless-2": (None, ["0:2", "2:4"]),
}


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pipeline_tokens_equal_single_process(arch, topology, reference):
    directory, prompts, expected = reference(arch)
    head_layers, stages = TOPOLOGIES[topology]

    async def scenario():
        async with pipeline(directory, head_layers, stages) as (head, _):
            outputs = await generate_all(head, [p for p in prompts], PARAMS)
            # each stage said how many threads it computes with (OMP_NUM_THREADS=1 here)
            assert [m.threads for m in head.membership.ordered()] == [1] * len(stages)
            return [o.outputs[0].token_ids for o in outputs], head.stats

    tokens, stats = asyncio.run(scenario())
    assert tokens == expected
    assert stats.num_requests_in_two_microbatches == 0
    if stages:
        assert stats.max_microbatches_in_flight > 1
    if head_layers is not None and stages:
        # One tensor per token crosses a hop: the hidden state (residual folded in), fp32.
        hidden_size = 64
        assert stats.activation_bytes_sent == stats.activation_tokens_sent * hidden_size * 4


@pytest.mark.parametrize("schedule", ["molink", "fifo"])
def test_chunked_transmission_and_compute_give_identical_tokens(schedule, reference):
    """Prefill activations cut into 3-token chunks on every hop, each computed by the
    next stage as it arrives (and re-cut there), give exactly the unchunked tokens."""
    directory, prompts, expected = reference("llama")

    async def scenario():
        async with pipeline(directory, (0, 1), ["1:3", "3:"], link_schedule=schedule,
                            max_chunk_tokens=3) as (head, _):
            outputs = await generate_all(head, prompts, PARAMS)
            return [o.outputs[0].token_ids for o in outputs], head.stats, head.hop_stats()

    tokens, stats, hops = asyncio.run(scenario())
    assert tokens == expected
    assert stats.num_requests_in_two_microbatches == 0
    assert len(hops) == 3 and hops[-1].label.startswith("layers 3:4")
    assert hops[-1].label.endswith("-> head")
    prompt_tokens = sum(len(p) for p in prompts)
    total = prompt_tokens + NUM_REQUESTS * (PARAMS.max_tokens - 1)  # rows that must cross
    assert hops[0].tokens_sent == total  # the head's own hop: read live
    for hop in hops[:-1]:
        # Stage hops: as reported with the latest result (a report may trail its hop's
        # last few messages, never lead them).
        assert 0.9 * total <= hop.tokens_sent <= total
        if schedule == "molink":  # cut: many more messages than steps
            assert hop.messages_sent >= stats.num_steps_dispatched + prompt_tokens // 3 - 16
        else:  # fifo sends every step whole
            assert hop.messages_sent == stats.num_steps_dispatched
    assert hops[-1].messages_sent == stats.num_steps_dispatched  # one result per step
    assert all(h.bandwidth_bps > 0 and h.latency_s > 0 for h in hops)
