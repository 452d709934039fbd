"""What the last stage returns to the head: a step's result once all of its chunks are
computed, and where the step's time went on every stage."""

from __future__ import annotations

import dataclasses

from molink.messages import StepOutput
from molink.transport.codec import encode_result


@dataclasses.dataclass(frozen=True)
class Timings:
    """Where a computed step spent its time so far (seconds per stage, pipeline order)."""

    compute_s: tuple[float, ...]
    wait_s: tuple[float, ...]
    computed_at: float  # time.monotonic() when this stage's compute ended


@dataclasses.dataclass
class _Gathering:
    """The chunks of one step the last stage has computed so far."""

    output: StepOutput
    tokens: int = 0
    error: str = ""
    timings: list[float] = dataclasses.field(default_factory=list)  # compute, per stage
    waits: list[float] = dataclasses.field(default_factory=list)  # arrival -> compute start


class Gatherer:
    """The last stage's steps in progress, by (epoch, step id)."""

    def __init__(self) -> None:
        self._steps: dict[tuple[int, int], _Gathering] = {}

    def clear(self) -> None:
        self._steps.clear()

    def add(self, step, output, error: str, times: Timings):
        """Add one computed chunk; -> the step's encoded result once all tokens are in."""
        plan = step.plan
        key = (step.epoch, plan.step_id)
        gathering = self._steps.setdefault(
            key, _Gathering(StepOutput(plan.step_id, microbatch_id=plan.microbatch_id)))
        gathering.tokens += plan.num_tokens
        gathering.error = gathering.error or error
        if output is not None:
            gathering.output.sampled_token_ids.update(output.sampled_token_ids)
            gathering.output.logprobs.update(output.logprobs)
            for request_id, positions in output.prompt_logprobs.items():
                gathering.output.prompt_logprobs.setdefault(request_id, {}).update(positions)
        add_into(gathering.timings, times.compute_s)
        add_into(gathering.waits, times.wait_s)
        if gathering.tokens < step.step_num_tokens:
            return None
        del self._steps[key]
        return encode_result(gathering.output, error=gathering.error,
                             stage_compute_s=tuple(gathering.timings),
                             hops=step.hops,  # the sender adds its own hop's report
                             epoch=step.epoch, stage_wait_s=tuple(gathering.waits))


def add_into(totals: list[float], values: tuple[float, ...]) -> None:
    """Per-stage sums over a step's chunks."""
    if len(totals) < len(values):
        totals.extend([0.0] * (len(values) - len(totals)))
    for i, seconds in enumerate(values):
        totals[i] += seconds
