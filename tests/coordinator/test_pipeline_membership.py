"""Joining is validated, peers authenticate, network input is never unpickled, and a dead
stage fails its requests clearly and can be replaced without restarting anything else."""

from __future__ import annotations

import asyncio
import json
import pickle
import time

import grpc
import pytest

from molink import SamplingParams
from molink.coordinator.pipeline_head import PipelineNotReady, StageUnavailable
from molink.transport.peers import Peer
from tests.coordinator.pipeline_harness import make_head, pipeline, start_stage
from tests.model_factory import build_model

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
FAILURE_DEADLINE_S = 10.0


async def _refusal(model_dir, head, layers, **kwargs) -> str:
    proc = await start_stage(model_dir, layers, head.address, **kwargs)
    _, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 3
    return stderr.decode()


def test_joins_are_validated_with_specific_reasons(tiny_model_dir, tmp_path):
    directory = tiny_model_dir("llama")
    other = build_model("llama", tmp_path / "other", num_hidden_layers=4, hidden_size=32,
                        intermediate_size=64)
    other_config = json.loads((other / "config.json").read_text())
    assert other_config["hidden_size"] != 64

    async def scenario():
        head = make_head(directory, (0, 2))
        await head.start("127.0.0.1", 0)
        try:
            wrong_token, overlap, mismatch = await asyncio.gather(
                _refusal(directory, head, "2:4", token="not-the-token"),
                _refusal(directory, head, "1:4"),
                _refusal(other, head, "2:4"))
            assert not head.ready and head.health() == (False, "layers 2:4 are not served")
            with pytest.raises(PipelineNotReady, match="layers 2:4 are not served"):
                async for _ in head.generate("hello", PARAMS):
                    pass
            return wrong_token, overlap, mismatch
        finally:
            await head.stop()

    wrong_token, overlap, mismatch = asyncio.run(scenario())
    assert "cluster token mismatch" in wrong_token
    assert "layers 1:4 overlap layers 0:2 already served by the head" in overlap
    assert "model mismatch" in mismatch


def test_crafted_bytes_are_refused_without_unpickling(tiny_model_dir, tmp_path):
    """A pickle payload sent to a stage's data stream is rejected as malformed protobuf."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Exploit())

    async def scenario():
        async with pipeline(tiny_model_dir("llama"), (0, 2), ["2:4"]) as (head, _):
            stage = head.membership.ordered()[0]
            peer = await Peer.open(stage.address, head.security)  # proves the token
            try:
                forward = peer.channel.stream_stream("/molink.Stage/Forward")  # raw bytes

                async def requests():
                    yield payload

                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in forward(requests(), metadata=peer.metadata):
                        pass
                unauthenticated = peer.channel.unary_unary("/molink.Stage/Health")
                with pytest.raises(grpc.aio.AioRpcError) as no_token:
                    await unauthenticated(b"", timeout=5)
            finally:
                await peer.close()
            # The stage is still healthy and serving.
            outputs = [o async for o in head.generate([5, 6, 7], PARAMS)]
            return refused.value.code(), no_token.value.code(), outputs[-1]

    code, no_token_code, final = asyncio.run(scenario())
    assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.UNKNOWN)
    assert no_token_code == grpc.StatusCode.UNAUTHENTICATED
    assert not marker.exists()
    assert len(final.outputs[0].token_ids) == 8


def test_dead_stage_fails_requests_then_a_replacement_restores_service(tiny_model_dir):
    """With failover off (--failover-timeout 0), the requests fail at once."""
    directory = tiny_model_dir("llama")
    long_params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def scenario():
        async with pipeline(directory, (0, 2), ["2:4"], failover_timeout_s=0) as (head, procs):
            async def consume():
                async for _ in head.generate([5, 6, 7, 8], long_params):
                    pass

            task = asyncio.create_task(consume())
            while head.stats.num_steps_completed < 5:  # generation is under way
                await asyncio.sleep(0.01)
            procs[0].kill()
            killed_at = time.monotonic()
            with pytest.raises(StageUnavailable, match="layers 2:4 at 127.0.0.1:"):
                await task
            elapsed = time.monotonic() - killed_at
            health = head.health()
            replacement = await start_stage(directory, "2:4", head.address)
            procs.append(replacement)
            await head.wait_ready(120)
            final = [o async for o in head.generate([5, 6, 7, 8], PARAMS)][-1]
            return elapsed, health, final

    elapsed, health, final = asyncio.run(scenario())
    assert elapsed <= FAILURE_DEADLINE_S
    assert health == (False, "layers 2:4 are not served")
    assert len(final.outputs[0].token_ids) == 8
