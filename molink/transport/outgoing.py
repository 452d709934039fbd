"""OutgoingStep: a computed step (or a chunk of one) handed to a ``HopSender``, with what
the head learns from its trip so far (each stage's wait and compute, each hop's report)."""

from __future__ import annotations

import dataclasses

from molink.messages import LinkReport, RawTensor, StepPlan
from molink.transport.codec import PART_WHOLE


@dataclasses.dataclass
class OutgoingStep:
    """A computed step (or a chunk of one) leaving this process."""

    plan: StepPlan
    activations: RawTensor | None  # of plan.batch's tokens, rows in order; or None
    step_num_tokens: int
    reset: bool = False
    error: str = ""
    stage_compute_s: tuple[float, ...] = ()
    hops: tuple[LinkReport, ...] = ()  # upstream hops; this hop's report is appended
    part: int = PART_WHOLE  # the part of the step this is, when it is one already
    epoch: int = 0  # the route epoch the step was planned in
    stage_wait_s: tuple[float, ...] = ()  # arrival -> compute start, each stage so far
    computed_at: float = 0.0  # time.monotonic() when this process finished computing it
