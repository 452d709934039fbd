"""``molink demo``: a three-stage pipeline on this machine, one streamed answer.

The head serves the first layer range in this process; two ``molink join`` processes serve
the rest on 127.0.0.1, exactly as they would on other machines. All processes started
here are stopped here.
"""

from __future__ import annotations

import os
import secrets

from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.pipeline_head import PipelineHead
from molink.entrypoints.local_pipeline import THREADS_VAR, LocalPipeline, StageExited, fair_share
from molink.model.loader import load_config
from molink.runtime.intra_op import use_threads
from molink.sampling_params import SamplingParams
from molink.scheduler.placement import split_layers
from molink.transport.peers import PeerSecurity

__all__ = ["StageExited", "run"]

NUM_STAGES = 3


async def run(model: str, prompt: str, params: SamplingParams, dtype: str, device: str) -> int:
    num_layers = load_config(model).arch.num_layers
    ranges = split_layers(num_layers, min(NUM_STAGES, num_layers))
    if THREADS_VAR not in os.environ:  # the head computes with its share, as each stage does
        use_threads(fair_share(len(ranges)))
    token = secrets.token_hex(16)
    head = PipelineHead(ModelConfig(model=model, dtype=dtype, device=device), CacheConfig(),
                        SchedulerConfig(), HeadConfig(head_layers=ranges[0]),
                        security=PeerSecurity.create(token))
    print(f"starting a {len(ranges)}-stage pipeline on 127.0.0.1 ...", flush=True)
    async with LocalPipeline(head, token, model, ranges[1:],
                             join_options=["--dtype", dtype, "--device", device]):
        print(f"pipeline: {head.describe()}\n", flush=True)
        await _stream(head, prompt, params)
    _print_how_to_run_it_yourself(model, ranges)
    return 0


async def _stream(head: PipelineHead, prompt: str, params: SamplingParams) -> None:
    print(prompt, end="", flush=True)
    printed = 0
    async for output in head.generate(prompt, params):
        text = output.outputs[0].text
        print(text[printed:], end="", flush=True)
        printed = len(text)
    print("\n", flush=True)


def _print_how_to_run_it_yourself(model: str, ranges: list[tuple[int, int]]) -> None:
    rest = " and ".join(f"layers {a}:{b}" for a, b in ranges[1:])
    print(f"The head served layers {ranges[0][0]}:{ranges[0][1]} in this process; {rest} ran in")
    print("separate `molink join` processes, exactly as they would on other machines:")
    for start, end in ranges[1:]:
        print(f"  molink join {model} --head HEAD_IP:PEER_PORT --layers {start}:{end}")
