"""The step breakdown says where a token's trip goes: a 30 ms link on the hop back to the head
shows as wire time, not as any stage's wait or compute, and the parts add up to the round
trip the head measured."""

from __future__ import annotations

import asyncio

from molink import SamplingParams
from molink.entrypoints.local_pipeline import LocalPipeline
from molink.transport.link_emulator import LinkEmulator, LinkSpec
from tests.coordinator.pipeline_harness import STAGE_OPTIONS, TOKEN, generate_all, make_head

LATENCY_S = 0.030


def test_a_slow_link_shows_as_wire_time_and_the_parts_add_up(tiny_model_dir):
    directory = tiny_model_dir("llama")  # 4 layers
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5 + i, 9, 11, 13 + i] for i in range(4)]

    async def scenario():
        head = make_head(directory, (0, 1), num_microbatches=1)
        local = LocalPipeline(head, TOKEN, directory, join_options=STAGE_OPTIONS,
                              env={"OMP_NUM_THREADS": "1"})
        relay = None
        try:
            port = await local.start_head()
            relay = LinkEmulator(LinkSpec(1e9, LATENCY_S), "127.0.0.1", port, "127.0.0.1", 0)
            head.advertised_address = f"127.0.0.1:{await relay.start()}"  # results: via it
            await local.start_stage((1, 3))
            await local.start_stage((3, 4))
            await local.wait_ready()
            await generate_all(head, prompts, params)
            return head.breakdown.totals["decode"], head.breakdown.recent_means("decode")
        finally:
            await local.stop()
            if relay is not None:
                await relay.stop()

    totals, recent = asyncio.run(scenario())
    assert totals.count >= params.max_tokens - 1  # one micro-batch: a step per token
    assert len(totals.compute_s) == len(totals.wait_s) == len(totals.send_wait_s) == 3
    means = totals.means()
    assert all(seconds > 0 for seconds in means["compute"])
    assert all(seconds >= 0 for seconds in means["wait"] + means["send_wait"])
    # The link's latency is on the wire, once per step (the relay holds every result 30 ms).
    assert means["wire"] >= LATENCY_S
    for part in ("wait", "compute", "send_wait"):
        assert all(seconds < means["wire"] for seconds in means[part]), part
    inside = sum(means["wait"]) + sum(means["compute"]) + sum(means["send_wait"])
    assert abs(inside + means["wire"] - means["round_trip"]) < 1e-9
    assert recent["steps"] == min(totals.count, 128) and recent["wire"] >= LATENCY_S
