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


class _DuringPrefill:
    """A head listener: tokens each short stream got from steps that computed part of the
    long prompt before its first token, and the prefill budget /metrics showed for each,
    counted as the head produces them (a consumer on a loaded machine may read them later,
    after the long prompt's first token)."""

    def __init__(self, head, num_shorts: int) -> None:
        self.head = head
        self.metrics = HeadMetrics(head)
        self.during = [0] * num_shorts
        self.budgets: list[float] = []
        self.long_first = False

    def on_output(self, output) -> None:
        long = self.head.loop.scheduler.get_request("long")
        if output.request_id == "long":
            self.long_first = True
        elif long is not None and long.num_computed_tokens and not self.long_first:
            self.during[int(output.request_id.removeprefix("short-"))] += 1
            if not output.finished:  # (its last token's step may have had nothing decoding)
                self.budgets.append(
                    metric_samples(self.metrics)["molink_prefill_budget_tokens"])

    def on_request_added(self, request_id: str) -> None:
        pass

    on_request_aborted = on_request_failed = on_request_added


async def _run(head, shorts, long_prompt):
    """-> (every output's tokens, tokens each short stream got while the long prompt was
    prefilled, the prefill budget /metrics showed then, while streams still decoded)."""
    recorder = _DuringPrefill(head, len(shorts))
    head.loop.listeners.append(recorder)
    outputs: dict[int, list[int]] = {}
    decoding = asyncio.Event()

    async def short(i, prompt):
        async for out in head.generate(prompt, SHORT, request_id=f"short-{i}"):
            if out.outputs[0].token_ids:
                decoding.set()
            outputs[i] = list(out.outputs[0].token_ids)

    async def long():
        await decoding.wait()
        async for out in head.generate(long_prompt, LONG, request_id="long"):
            outputs[len(shorts)] = list(out.outputs[0].token_ids)

    await asyncio.gather(*(short(i, p) for i, p in enumerate(shorts)), long())
    return [outputs[i] for i in range(len(shorts) + 1)], recorder.during, recorder.budgets


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
