"""Nothing waits forever: a stage whose compute is stuck (its event loop still answering
health checks) fails the requests in the pipeline within the step deadline, with a clear
error (failover off: with it, they would wait for a replacement), and service resumes when
the stage recovers."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from molink import SamplingParams
from molink.config import CacheConfig, ModelConfig
from molink.coordinator.pipeline_head import StageUnavailable
from molink.coordinator.step_deadlines import STEP_DEADLINE_MIN_S
from molink.runtime.stage_executor import StageExecutor
from molink.stage.worker import StageWorker
from molink.transport import molink_pb2 as pb
from tests.coordinator.pipeline_harness import make_head

PARAMS = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


class StallingExecutor:
    """A real executor whose compute blocks (thread stuck, process alive) once armed."""

    def __init__(self, executor: StageExecutor) -> None:
        self._executor = executor
        self.armed = False
        self.release = threading.Event()

    def execute(self, plan, hidden=None):
        if self.armed:
            self.release.wait()
        return self._executor.execute(plan, hidden)

    def __getattr__(self, name):
        return getattr(self._executor, name)


def test_a_stuck_stage_fails_its_requests_within_the_deadline(tiny_model_dir):
    directory = tiny_model_dir("llama")

    async def scenario():
        head = make_head(directory, (0, 2), failover_timeout_s=0)
        await head.start("127.0.0.1", 0)
        executor = StallingExecutor(StageExecutor(
            ModelConfig(model=str(directory), dtype="float32", device="cpu", start_layer=2),
            CacheConfig(block_size=8, num_blocks=256)))
        info = pb.StageInfo(start_layer=2, end_layer=4, model_fingerprint=head.membership
                            .identity.fingerprint, dtype="float32", block_size=8,
                            num_blocks=256, num_layers=4)
        worker = StageWorker(executor, info, head.security, head.address)
        info.port = await worker.start("127.0.0.1", 0)
        membership = asyncio.create_task(worker.keep_joined())
        try:
            await head.wait_ready(60)
            # A first request measures the step time, which sets the deadline.
            async for _ in head.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=24,
                                                                   ignore_eos=True)):
                pass
            outputs = 0
            started = None
            with pytest.raises(StageUnavailable) as failed:
                async for _ in head.generate([5, 6, 7], PARAMS):
                    outputs += 1
                    if outputs == 5:
                        executor.armed = True
                        started = time.monotonic()
            waited = time.monotonic() - started
            executor.release.set()
            executor.armed = False
            await head.wait_ready(60)  # the route is set up again
            final = None
            async for final in head.generate([5, 6, 7], SamplingParams(temperature=0,
                                                                       max_tokens=8)):
                pass
            return str(failed.value), waited, final, head.stats
        finally:
            executor.release.set()
            head.begin_stop()
            membership.cancel()
            await worker.stop()
            await head.stop()

    message, waited, final, stats = asyncio.run(scenario())
    assert "layers 2:4" in message and ("stuck" in message or "no result within" in message)
    assert STEP_DEADLINE_MIN_S - 1 < waited < STEP_DEADLINE_MIN_S + 8, waited
    assert len(final.outputs[0].token_ids) == 8
    assert stats.num_steps_timed_out + stats.num_stage_failures >= 1
