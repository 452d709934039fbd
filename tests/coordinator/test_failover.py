"""Failover by replay on 127.0.0.1, in this process: a lost stage's requests keep their
streams, are replayed on a new join, and produce exactly the tokens of an uninterrupted run,
greedy and seeded; with no replacement in time they fail clearly and the head stays up.
Standbys, graceful leaves and draining: across hosts, in tests/multihost/test_failover.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from molink import SamplingParams
from molink.coordinator.pipeline_head import StageUnavailable
from tests.coordinator.pipeline_harness import pipeline, start_stage

PROMPTS = [[5, 6, 7, 8], [11, 3, 9], [40, 41, 42, 43, 44, 45], [7] * 12]
GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=48, ignore_eos=True)
REQUESTS = [(p, GREEDY) for p in PROMPTS] + [(PROMPTS[0], SEEDED), (PROMPTS[2], SEEDED)]


async def _run(head, requests, on_progress=None) -> list[list[int] | Exception]:
    """Every request's tokens (or its exception); ``on_progress()`` once all have tokens."""
    started = asyncio.Event()
    progress: dict[int, int] = {}

    async def one(i, prompt, params):
        tokens = []
        async for output in head.generate(prompt, params):
            tokens = list(output.outputs[0].token_ids)
            progress[i] = len(tokens)
            if len(progress) == len(requests) and min(progress.values()) >= 4:
                started.set()
        return tokens

    tasks = [asyncio.create_task(one(i, p, s)) for i, (p, s) in enumerate(requests)]
    if on_progress is not None:
        await asyncio.wait_for(started.wait(), 60)
        await on_progress()
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def test_a_new_join_takes_over_then_with_none_requests_fail_in_time(tiny_model_dir):
    """No standby: the requests wait (streams open) until a new stage joins 3 s after the
    kill, and go on. Then with no replacement at all, every request fails clearly within the
    failover timeout, and the head stays up."""
    directory = tiny_model_dir("llama")
    timeout_s = 4

    async def scenario():
        # Room for a stage process to start (imports, weights: ~5-10 s on a busy machine).
        async with pipeline(directory, (0, 2), ["2:"], failover_timeout_s=60) as (head, procs):
            reference = await _run(head, REQUESTS)
            health = []

            async def kill_then_replace():
                procs[0].kill()
                await procs[0].wait()
                await asyncio.sleep(3)
                health.append(head.health())
                procs.append(await start_stage(directory, "2:", head.address))

            replaced = await _run(head, REQUESTS, kill_then_replace)
            stats = dataclasses.replace(head.stats)
            head.config = dataclasses.replace(head.config, failover_timeout_s=timeout_s)
            killed_at = []

            async def kill():
                procs[1].kill()
                killed_at.append(time.monotonic())

            failed = await _run(head, REQUESTS, kill)
            return (reference, replaced, health[0], stats, failed,
                    time.monotonic() - killed_at[0], head.health())

    reference, replaced, health, stats, failed, elapsed, final_health = asyncio.run(scenario())
    assert replaced == reference
    assert health[0] is False and "failing over" in health[1], health
    assert "layers 2:4 are not served" in health[1]
    assert stats.num_replays_done == stats.num_requests_replayed >= 1
    assert stats.replay_pause_s_max > 3
    assert all(isinstance(o, StageUnavailable) for o in failed), failed
    message = str(failed[0])
    assert "layers 2:4 at 127.0.0.1:" in message
    assert f"no stage took over layers 2:4 within {timeout_s} s" in message
    assert elapsed < timeout_s + 8  # detection (two missed health checks) + the timeout
    assert final_health == (False, "layers 2:4 are not served")
