"""The local-pipeline launcher: ready from the head's health, a stage that dies ends the wait
at once with its log, and every process it started is gone afterwards."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.pipeline_head import PipelineHead
from molink.entrypoints.local_pipeline import LocalPipeline, StageExited
from molink.transport.peers import PeerSecurity

TOKEN = "local-pipeline-test-token"
OPTIONS = ["--dtype", "float32", "--device", "cpu"]


def _head(model_dir, head_layers) -> PipelineHead:
    return PipelineHead(ModelConfig(model=str(model_dir), dtype="float32", device="cpu"),
                        CacheConfig(num_blocks=64), SchedulerConfig(),
                        HeadConfig(head_layers=head_layers), security=PeerSecurity.create(TOKEN))


def test_a_ready_pipeline_is_stopped_by_pid(tiny_model_dir):
    model = tiny_model_dir("llama")

    async def main():
        async with LocalPipeline(_head(model, (0, 2)), TOKEN, model, [(2, 3), (3, 4)],
                                 join_options=OPTIONS) as pipe:
            assert pipe.head.health()[0]
            described = pipe.head.describe()
            assert "-> layers 2:3 at 127.0.0.1:" in described
            assert "-> layers 3:4 at 127.0.0.1:" in described
            assert len(set(pipe.pids)) == 2
        return pipe.procs

    procs = asyncio.run(main())
    assert all(proc.returncode is not None for proc in procs)


def test_a_stage_that_exits_ends_the_wait_with_its_log(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")

    async def main():
        # a wrong token: the head refuses the stage, which exits with the reason
        pipe = LocalPipeline(_head(model, (0, 2)), "not-the-token", model, [(2, 4)],
                             join_options=OPTIONS, log_dir=tmp_path)
        started = time.monotonic()
        with pytest.raises(StageExited, match="stage process 1 exited with code") as caught:
            async with pipe:
                raise AssertionError("the pipeline cannot become ready")
        assert time.monotonic() - started < 60  # not the 300 s readiness timeout
        return pipe.procs, str(caught.value)

    procs, message = asyncio.run(main())
    assert all(proc.returncode is not None for proc in procs)
    assert (tmp_path / "stage0.log").read_text().strip().splitlines()[-1] in message


def test_stage_processes_get_their_share_of_the_cores_unless_told(monkeypatch):
    """Processes on one machine share its cores: each stage gets threads for its share (a
    stage with every core would spin its OpenMP threads against the others'); a thread
    count the caller or the environment gives is kept."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    two_stages = LocalPipeline(None, "token", "model", [(1, 2), (2, 3)])
    assert two_stages.env["OMP_NUM_THREADS"] == "2"  # 8 cores, 3 processes
    assert LocalPipeline(None, "token", "model", [(1, 2)] * 9).env["OMP_NUM_THREADS"] == "1"
    told = LocalPipeline(None, "token", "model", [(1, 2)], env={"OMP_NUM_THREADS": "3"})
    assert told.env["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert LocalPipeline(None, "token", "model", [(1, 2)]).env["OMP_NUM_THREADS"] == "5"
