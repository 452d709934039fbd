"""Step deadlines: how long a step may take before the head counts it as lost."""

from __future__ import annotations

import time
from collections.abc import Callable

from molink.messages import StepPlan

STEP_DEADLINE_MIN_S = 10.0
STEP_DEADLINE_FACTOR = 10.0
FIRST_STEPS_DEADLINE_S = 120.0  # before any step time is measured (warm-up, loading)


def step_deadline_s(predicted_compute_s: float | None, hops, num_in_flight: int) -> float:
    """A multiple of what a step is expected to take behind the other micro-batches in
    flight (``predicted_compute_s``: its compute, None before any measurement), plus the
    links' latency there and back (``hops``: each hop's measurement)."""
    if predicted_compute_s is None:
        return FIRST_STEPS_DEADLINE_S
    links = sum(2 * hop.latency_s for hop in hops)
    expected = predicted_compute_s * max(1, num_in_flight) + links
    return max(STEP_DEADLINE_MIN_S, STEP_DEADLINE_FACTOR * expected)


def overdue_step(in_flight: dict[int, StepPlan], dispatched_at: dict[int, float],
                 deadline_s: Callable[[int], float]) -> str:
    """Describes the oldest step in flight past its deadline ("" when none is);
    ``deadline_s(num_tokens)`` gives a step's deadline."""
    now = time.monotonic()
    for step_id, plan in in_flight.items():
        waited = now - dispatched_at.get(step_id, now)
        deadline = deadline_s(plan.num_tokens)
        if waited > deadline:
            return f"step {step_id} got no result within {deadline:.0f} s"
    return ""
