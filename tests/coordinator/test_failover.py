"""Failover by replay on 127.0.0.1 (the netns suite repeats it across hosts): a lost or
leaving stage's requests keep their streams, are replayed on a standby or a new join, and
produce exactly the tokens of an uninterrupted run, greedy and seeded; with no replacement
in time they fail clearly and the head stays up."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
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


async def _wait_for_standby(head) -> None:
    while not head.membership.standbys:
        await asyncio.sleep(0.1)


def test_standbys_take_over_a_killed_and_a_leaving_stage(tiny_model_dir):
    """SIGKILL on the middle stage while 6 requests generate: the standby for its layers
    takes over; then SIGTERM (a graceful leave) on that one with a second standby present.
    Every request ends both times with the tokens of the uninterrupted run."""
    directory = tiny_model_dir("llama")

    async def scenario():
        async with pipeline(directory, (0, 1), ["1:3", "3:"]) as (head, procs):
            reference = await _run(head, REQUESTS)
            procs.append(await start_stage(directory, "1:3", head.address, extra=("--standby",)))
            await _wait_for_standby(head)
            described, roles = head.describe(), [role for _, role in head.stage_roles()]

            async def kill_middle():
                procs[0].kill()

            after_kill = await _run(head, REQUESTS, kill_middle)
            stats_kill = dataclasses.replace(head.stats)
            procs.append(await start_stage(directory, "1:3", head.address, extra=("--standby",)))
            await _wait_for_standby(head)

            async def middle_leaves():
                procs[2].send_signal(signal.SIGTERM)

            after_leave = await _run(head, REQUESTS, middle_leaves)
            left = await asyncio.wait_for(procs[2].wait(), 30)
            return (reference, after_kill, after_leave, described, roles, stats_kill,
                    head.stats, head.stage_roles(), head.scheduler, left)

    (reference, after_kill, after_leave, described, roles, stats_kill, stats, final_roles,
     scheduler, left) = asyncio.run(scenario())
    assert "standby: layers 1:3" in described
    assert roles == ["active", "active", "standby"]
    assert after_kill == reference
    assert stats_kill.num_failovers == 1 and stats_kill.num_stage_failures == 1
    assert stats_kill.num_replays_done == stats_kill.num_requests_replayed >= 1
    assert after_leave == reference
    assert left == 0  # the leaving stage exited by itself once the head let it go
    assert stats.num_failovers == 2 and stats.num_stage_failures == 1  # a leave is no failure
    assert stats.num_replays_done == stats.num_requests_replayed > stats_kill.num_requests_replayed
    assert [role for _, role in final_roles] == ["active", "active"]  # the standby is routed
    assert scheduler.num_used_blocks == 0 and scheduler.num_running == 0


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
