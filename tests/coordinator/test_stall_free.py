"""End to end: a long prompt arriving while requests decode is computed in chunks beside
them, at the head and at every stage, without changing a token."""

from __future__ import annotations

import asyncio

import pytest

from molink import LLM, SamplingParams
from molink.config import SchedulerConfig
from molink.entrypoints.metrics import HeadMetrics
from tests.coordinator.pipeline_harness import pipeline
from tests.entrypoints.test_metrics import metric_samples
from tests.model.arch_checks import make_prompts

SHORT = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
LONG_PROMPT = 200
MAX_BATCHED_TOKENS = SchedulerConfig().max_num_batched_tokens  # the harness's default


async def _run(head, shorts, long_prompt):
    """-> (every output's tokens, tokens each short stream got while the long prompt was
    prefilled: from its submission to its first token, the prefill budget /metrics showed
    then, while streams still decoded)."""
    metrics = HeadMetrics(head)
    budgets: list[float] = []
    outputs: dict[int, list[int]] = {}
    during: list[int] = [0] * len(shorts)
    state = {"long_started": False, "long_first": False}
    decoding = asyncio.Event()

    async def short(i, prompt):
        async for out in head.generate(prompt, SHORT):
            if out.outputs[0].token_ids:
                decoding.set()
            if state["long_started"] and not state["long_first"]:
                during[i] += 1
                if not out.finished:  # (its last token's step may have had nothing decoding)
                    budgets.append(metric_samples(metrics)["molink_prefill_budget_tokens"])
            outputs[i] = list(out.outputs[0].token_ids)

    async def long():
        await decoding.wait()
        state["long_started"] = True
        async for out in head.generate(long_prompt, LONG):
            state["long_first"] = True
            outputs[len(shorts)] = list(out.outputs[0].token_ids)

    await asyncio.gather(*(short(i, p) for i, p in enumerate(shorts)), long())
    return [outputs[i] for i in range(len(shorts) + 1)], during, budgets


@pytest.mark.parametrize("factor", [0.005, 0.0])
def test_a_long_prompt_is_chunked_beside_decodes_and_tokens_do_not_change(tiny_model_dir, factor):
    """With the bound, the 200-token prompt goes in 16-token chunks (the smallest: the
    factor is tiny, so even a stage whose fixed cost is 3,000 tokens' worth allows no more),
    one per step beside the decodes (one micro-batch), so every short
    stream keeps getting tokens while it is prefilled; without it (factor 0) the prompt
    goes in one step and they get at most a couple. Tokens equal one process's."""
    directory = tiny_model_dir("llama")
    prompts = make_prompts(512, (5, 9, 13, LONG_PROMPT), seed=7)
    shorts, long_prompt = prompts[:3], prompts[3]
    llm = LLM(model=str(directory), dtype="float32", device="cpu", block_size=8)
    expected = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in shorts], SHORT)]
    expected.append(llm.generate([{"prompt_token_ids": long_prompt}], LONG)[0]
                    .outputs[0].token_ids)

    async def main():
        async with pipeline(directory, (0, 1), ["1:3", "3:"], num_microbatches=1,
                            decode_stall_factor=factor) as (head, _):
            return await _run(head, shorts, long_prompt)

    tokens, during, budgets = asyncio.run(main())
    assert tokens == expected
    if factor:
        assert min(during) >= LONG_PROMPT // 16 - 2, during
        assert budgets and set(budgets) == {16}, [int(b) for b in budgets]
    else:
        assert max(during) <= 2, during
        assert budgets and set(budgets) == {MAX_BATCHED_TOKENS}, budgets
