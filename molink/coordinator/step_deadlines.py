"""Step deadlines: how long a step may take before the head counts it as lost."""

from __future__ import annotations

import time
from collections.abc import Callable

from molink.messages import StepPlan

STEP_DEADLINE_MIN_S = 10.0
STEP_DEADLINE_FACTOR = 10.0
FIRST_STEPS_DEADLINE_S = 120.0  # before any step time is measured (warm-up, loading)


def step_deadline_s(predicted_compute_s: float | None, hops, in_flight) -> float:
    """A multiple of what a step is expected to take behind the other micro-batches in
    flight (``in_flight``: their plans; ``predicted_compute_s``: the step's compute, None
    before any measurement): their compute, the links' latency there and back, and the
    time each link takes to carry every step in flight (``hops``: each hop's measurement;
    a prefill burst over a slow link is seconds of bytes ahead of the last step)."""
    if predicted_compute_s is None:
        return FIRST_STEPS_DEADLINE_S
    plans = list(in_flight)
    tokens = sum(plan.num_tokens for plan in plans)
    links = sum(2 * hop.latency_s + _transfer_s(hop, tokens) for hop in hops)
    expected = predicted_compute_s * max(1, len(plans)) + links
    return max(STEP_DEADLINE_MIN_S, STEP_DEADLINE_FACTOR * expected)


def _transfer_s(hop, tokens: int) -> float:
    """Seconds ``hop`` takes for ``tokens`` rows at its measured bytes per row (0 before
    it has measured its bandwidth or carried anything)."""
    if hop.bandwidth_bps <= 0 or hop.tokens_sent <= 0:
        return 0.0
    return tokens * hop.bytes_sent / hop.tokens_sent * 8 / hop.bandwidth_bps


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
