"""``molink demo``: a three-stage pipeline on this machine, one streamed answer.

The head serves the first layer range in this process; two ``molink join`` processes serve
the rest on 127.0.0.1, exactly as they would on other machines. All processes started
here are stopped here.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys

from molink import envs
from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.pipeline_head import PipelineHead
from molink.entrypoints.join import finish_pending_tasks
from molink.model.loader import load_config
from molink.sampling_params import SamplingParams
from molink.transport.peers import PeerSecurity

READY_TIMEOUT_S = 300.0


def split_layers(num_layers: int, num_stages: int = 3) -> list[tuple[int, int]]:
    """Contiguous, near-equal half-open ranges covering every layer."""
    num_stages = min(num_stages, num_layers)
    bounds = [round(i * num_layers / num_stages) for i in range(num_stages + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


async def run(model: str, prompt: str, params: SamplingParams, dtype: str, device: str) -> int:
    ranges = split_layers(load_config(model).arch.num_layers)
    token = secrets.token_hex(16)
    head = PipelineHead(ModelConfig(model=model, dtype=dtype, device=device), CacheConfig(),
                        SchedulerConfig(), HeadConfig(head_layers=ranges[0]),
                        security=PeerSecurity.create(token))
    await head.start("127.0.0.1", 0)
    env = dict(os.environ, **{envs.CLUSTER_TOKEN_VAR: token})  # not on the command line
    procs = []
    try:
        for start, end in ranges[1:]:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "molink.entrypoints.cli", "--log-level", "warning", "join", model,
                "--head", head.address, "--layers", f"{start}:{end}", "--host", "127.0.0.1",
                "--dtype", dtype, "--device", device, env=env,
                stdout=asyncio.subprocess.DEVNULL))
        print(f"starting a {len(ranges)}-stage pipeline on 127.0.0.1 ...", flush=True)
        await _wait_ready(head, procs)
        print(f"pipeline: {head.describe()}\n", flush=True)
        await _stream(head, prompt, params)
        _print_how_to_run_it_yourself(model, ranges)
        return 0
    finally:
        head.begin_stop()
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()  # by pid
            await proc.wait()
        await head.stop()
        await finish_pending_tasks()  # else asyncio.run cancels gRPC's and it logs tracebacks


class StageExited(Exception):
    """A stage process of the demo ended before the pipeline was ready."""


async def _wait_ready(head: PipelineHead, procs) -> None:
    """Until the pipeline is ready; a stage process that exits first ends the wait with
    its exit code (its own message is on stderr), instead of waiting out the timeout."""
    ready = asyncio.create_task(head.wait_ready(READY_TIMEOUT_S))
    exits = {asyncio.create_task(proc.wait()): proc for proc in procs}
    try:
        done, _ = await asyncio.wait({ready, *exits}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (ready, *exits):
            task.cancel()
    if ready in done:
        ready.result()  # TimeoutError naming the missing layers
        return
    code = next(iter(exits[t] for t in done if t in exits)).returncode
    raise StageExited(f"a stage process exited with code {code} before the pipeline was ready")


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
