"""``--quantization int8`` on a stage process: the pipeline answers what an in-process
model quantized the same way answers (the int8 weights of a layer do not depend on which
node quantized them, so greedy tokens are identical)."""

from __future__ import annotations

import asyncio

from molink import LLM, SamplingParams
from tests.coordinator.pipeline_harness import make_head, start_stage, stop_process


def test_a_stage_quantized_at_load_answers_as_the_same_quantization_in_process(tiny_model_dir):
    directory = tiny_model_dir("llama")
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def scenario():
        head = make_head(directory, None)
        await head.start("127.0.0.1", 0)
        proc = await start_stage(directory, "0:", head.address,
                                 extra=("--quantization", "int8"))
        try:
            await head.wait_ready(120)
            loaded = await _line(proc.stderr, "loaded LlamaForCausalLM")
            assert "(float32, int8 weights)" in loaded, loaded
            return [await _final(head, prompt, params) for prompt in prompts]
        finally:
            await stop_process(proc)
            await head.stop()

    piped = asyncio.run(scenario())
    quantized = LLM(model=str(directory), dtype="float32", device="cpu", block_size=8,
                    quantization="int8")
    prompt_inputs = [{"prompt_token_ids": p} for p in prompts]
    expected = [o.outputs[0].token_ids for o in quantized.generate(prompt_inputs, params)]
    assert [o.outputs[0].token_ids for o in piped] == expected


async def _line(stream, text: str) -> str:
    while line := (await asyncio.wait_for(stream.readline(), 60)).decode():
        if text in line:
            return line
    raise AssertionError(f"the stage never logged {text!r}")


async def _final(head, prompt, params):
    final = None
    async for final in head.generate(prompt, params):
        pass
    return final
