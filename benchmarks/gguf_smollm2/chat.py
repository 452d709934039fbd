"""Three stages (head + 2 `molink join` processes) behind the real HTTP API."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from benchmarks.gguf_smollm2.common import MAX_TOKENS, NUM_STAGES, PROMPTS, TOKEN, log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def pipeline_phase(path: Path, prompts: list[list[int]], dtype: str):
    import uvicorn
    from openai import OpenAI

    from molink import SamplingParams
    from molink.config import CacheConfig, ModelConfig, SchedulerConfig
    from molink.coordinator.head_config import HeadConfig
    from molink.coordinator.pipeline_head import PipelineHead
    from molink.entrypoints.http_server import create_app
    from molink.entrypoints.local_pipeline import LocalPipeline
    from molink.model.loader import load_config
    from molink.scheduler.placement import split_layers
    from molink.transport.peers import PeerSecurity

    ranges = split_layers(load_config(str(path)).arch.num_layers, NUM_STAGES)
    log(f"3-stage pipeline: layers {ranges} (head + 2 `molink join` processes), {dtype}, "
        "loading")
    head = PipelineHead(ModelConfig(model=str(path), dtype=dtype, device="cpu"),
                        CacheConfig(), SchedulerConfig(), HeadConfig(head_layers=ranges[0]),
                        security=PeerSecurity.create(TOKEN))
    async with LocalPipeline(head, TOKEN, path, ranges[1:],
                             join_options=["--dtype", dtype, "--device", "cpu"]) as pipe:
        log(f"pipeline ready: {head.describe()} (stage pids {pipe.pids})")
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(head, "smollm2", log_requests=False),
                                               host="127.0.0.1", port=port, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                await asyncio.sleep(0.05)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

            def ask(question: str) -> str:
                reply = client.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": question}],
                    temperature=0, max_tokens=MAX_TOKENS)
                return reply.choices[0].message.content

            async def tokens(ids):
                final = None
                async for final in head.generate(ids, SamplingParams(temperature=0,
                                                                     max_tokens=MAX_TOKENS)):
                    pass
                return final.outputs[0].token_ids

            # One batch (decode cost is mostly dequantizing weights, shared by the batch):
            log("HTTP: 5 chat requests (openai client, greedy, max_tokens 64), alongside the "
                "same 5 prompts as token ids through head.generate (for agreement)")
            start = time.perf_counter()
            results = await asyncio.gather(*(asyncio.to_thread(ask, q) for q in PROMPTS),
                                           *(tokens(p) for p in prompts))
            answers, ids = results[:len(PROMPTS)], results[len(PROMPTS):]
            log(f"HTTP + token ids: done in {time.perf_counter() - start:.1f} s")
            for question, answer in zip(PROMPTS, answers):
                print(f"  Q: {question}\n  A: {answer!r}", flush=True)
        finally:
            server.should_exit = True
            await serving
    log("pipeline stopped (stage processes ended by pid)")
    return ranges, answers, list(ids)
