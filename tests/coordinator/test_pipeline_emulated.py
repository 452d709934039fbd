"""An emulated stage joins a real head: real transport and scheduling, profiled waiting."""

from __future__ import annotations

import asyncio

from molink import SamplingParams
from tests.coordinator.pipeline_harness import make_head, start_stage, stop_process


def test_emulated_last_stage_serves_pseudo_tokens(tiny_model_dir):
    directory = tiny_model_dir("llama")

    async def scenario():
        head = make_head(directory, (0, 2))
        await head.start("127.0.0.1", 0)
        proc = await start_stage(directory, "2:4", head.address,
                                 extra=("--emulate-device", "published"))
        try:
            await head.wait_ready(120)
            params = SamplingParams(temperature=0, max_tokens=20)  # EOS not ignored
            return await asyncio.gather(*(_final(head, [5, 6, 7 + i], params) for i in range(4)))
        finally:
            await stop_process(proc)
            await head.stop()

    outputs = asyncio.run(scenario())
    for output in outputs:
        completion = output.outputs[0]
        assert len(completion.token_ids) == 20 and completion.finish_reason == "length"
        assert 1 not in completion.token_ids  # never the EOS token
    assert outputs[0].outputs[0].token_ids != outputs[1].outputs[0].token_ids


async def _final(head, prompt, params):
    final = None
    async for final in head.generate(prompt, params):
        pass
    return final
