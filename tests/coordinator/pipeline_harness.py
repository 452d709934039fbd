"""Multi-process pipelines on 127.0.0.1 for tests: a head in this process, stages as
``molink join`` subprocesses on OS-chosen ports. Readiness comes from the head (every layer
joined), never from sleeping; every process started here is stopped here, by pid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from molink import SamplingParams
from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.pipeline_head import PipelineHead
from molink.entrypoints.local_pipeline import LocalPipeline
from molink.model.loader import load_config
from molink.scheduler.stall_bound import DEFAULT_STALL_FACTOR
from molink.transport.peers import PeerSecurity

TOKEN = "test-cluster-token"
READY_TIMEOUT_S = 120.0
STAGE_OPTIONS = ("--dtype", "float32", "--device", "cpu", "--block-size", "8")


def stage_command(model_dir, layers: str, head_address: str, token: str = TOKEN,
                  extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "molink.entrypoints.cli", "join", str(model_dir),
            "--head", head_address, "--layers", layers, "--host", "127.0.0.1",
            "--cluster-token", token, *STAGE_OPTIONS, *extra]


async def start_stage(model_dir, layers: str, head_address: str, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return await asyncio.create_subprocess_exec(
        *stage_command(model_dir, layers, head_address, **kwargs), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def stop_process(proc) -> None:
    if proc.returncode is None:
        proc.kill()  # by pid
    await proc.wait()


def make_head(model_dir, head_layers, num_microbatches=None, compression="auto",
              link_schedule="molink", max_chunk_tokens=None, failover_timeout_s=60.0,
              decode_stall_factor=DEFAULT_STALL_FACTOR, **scheduler) -> PipelineHead:
    """The default wire compression (lossless), so every pipeline test that compares tokens
    exactly with transformers also checks that the default changes nothing on the wire."""
    return PipelineHead(
        ModelConfig(model=str(model_dir), dtype="float32", device="cpu"),
        CacheConfig(block_size=8, num_blocks=256), SchedulerConfig(**scheduler),
        HeadConfig(head_layers=head_layers, num_microbatches=num_microbatches,
                   compression=compression, link_schedule=link_schedule,
                   max_chunk_tokens=max_chunk_tokens, failover_timeout_s=failover_timeout_s,
                   decode_stall_factor=decode_stall_factor),
        security=PeerSecurity.create(TOKEN))


@contextlib.asynccontextmanager
async def pipeline(model_dir, head_layers, stage_layers: list[str], **head_options):
    """A ready pipeline: yields (head, stage processes); a process appended to that list is
    stopped with the others. ``stage_layers``: ``--layers`` values ("START:" = to the end)."""
    num_layers = load_config(str(model_dir)).arch.num_layers
    ranges = [(int(start), int(end or num_layers))
              for start, end in (layers.split(":") for layers in stage_layers)]
    local = LocalPipeline(make_head(model_dir, head_layers, **head_options), TOKEN, model_dir,
                          ranges, join_options=STAGE_OPTIONS, env={"OMP_NUM_THREADS": "1"},
                          ready_timeout_s=READY_TIMEOUT_S)
    async with local:
        yield local.head, local.procs


async def generate_all(head: PipelineHead, prompts, params: SamplingParams):
    async def one(prompt):
        final = None
        async for output in head.generate(prompt, params):
            final = output
        return final

    return await asyncio.gather(*(one(p) for p in prompts))
