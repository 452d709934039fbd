"""A step's deadline counts what is ahead of it: a prefill burst over a slow link is seconds
of bytes on the wire, not a lost stage (it was: 512 prompts over 100 Mbit links made the
weak-links benchmark fail over at the start of a run)."""

from __future__ import annotations

from molink.coordinator.hop_stats import HopStats
from molink.coordinator.step_deadlines import (
    STEP_DEADLINE_FACTOR,
    STEP_DEADLINE_MIN_S,
    step_deadline_s,
)
from molink.messages import BatchEntry, StepPlan

ROW_BYTES = 10302  # a bf16 hidden state of 5120 on the wire


def _hop(mbit: float, latency_s: float, tokens_sent: int = 1000) -> HopStats:
    return HopStats("a -> b", mbit * 1e6, latency_s, ROW_BYTES * tokens_sent, 10, tokens_sent,
                    "none")


def _prefill(step_id: int, tokens: int) -> StepPlan:
    return StepPlan(step_id, [BatchEntry(f"r{step_id}", 0, tokens, True)])


def test_a_prefill_burst_over_slow_links_is_not_overdue():
    links = [_hop(100, 0.02), _hop(100, 0.02)]
    in_flight = [_prefill(i, 2048) for i in range(4)]  # 512 prompts of 16 tokens
    on_the_wire = 2 * 4 * 2048 * ROW_BYTES * 8 / 100e6  # two links, 84 MB each: 13.5 s
    deadline = step_deadline_s(0.05, links, in_flight)
    assert deadline >= STEP_DEADLINE_FACTOR * (on_the_wire + 4 * 0.05 + 4 * 0.02)
    assert deadline > STEP_DEADLINE_MIN_S  # the old deadline: 10 s, less than the transfer


def test_small_steps_on_fast_links_keep_the_minimum_and_unmeasured_links_add_nothing():
    decode = [StepPlan(i, [BatchEntry(f"r{i}", 7, 1, True)]) for i in range(3)]
    assert step_deadline_s(0.01, [_hop(10_000, 0.0001)], decode) == STEP_DEADLINE_MIN_S
    unmeasured = HopStats("a -> b", 0.0, 0.0, 0, 0, 0, "none")
    assert step_deadline_s(0.01, [unmeasured], [_prefill(1, 2048)]) == STEP_DEADLINE_MIN_S
    assert step_deadline_s(None, [], []) > STEP_DEADLINE_MIN_S  # before any measurement
