"""StepBreakdown: where a step's time goes on its trip through the pipeline.

Every step carries, per stage, how long it waited there before its compute began and how
long the compute took, and, per hop, how long it waited in the sender's process between
the end of its compute and its write (encoding, link scheduling, pacing). The head knows
when it dispatched the step and when the result arrived, so what is left is the time on
the wire, all hops together (one-way times of separate hops cannot be told apart without
synchronised clocks; each hop's measured latency is reported next to it)::

    round trip = sum(wait) + sum(compute) + sum(send wait) + wire
    head       = result arrived -> tokens delivered and the next step dispatched

Steps whose every request adds one token are ``decode`` steps (a token's trip); the others
(any prefill) are ``prefill`` steps. A prefill cut into chunks is computed chunk by chunk
on every stage at once, so its parts (summed over the chunks) can add up to more than its
round trip; its wire time is then counted as 0. Sums and counts since the route was set up
go to ``/metrics`` as summaries; ``recent_means`` averages the latest steps of a kind.
"""

from __future__ import annotations

import collections
import dataclasses

from molink.messages import StepPlan

KINDS = ("decode", "prefill")
RECENT_STEPS = 128


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """One step's times, seconds (stages and hops in pipeline order)."""

    round_trip_s: float  # dispatched -> result arrived, at the head
    wait_s: tuple[float, ...]  # per stage: arrival -> compute start
    compute_s: tuple[float, ...]  # per stage
    send_wait_s: tuple[float, ...]  # per hop: compute end -> written
    head_s: float  # result arrived -> delivered and the next step dispatched

    @property
    def wire_s(self) -> float:
        """The round trip less everything measured inside a process: the links' share."""
        inside = sum(self.wait_s) + sum(self.compute_s) + sum(self.send_wait_s)
        return max(0.0, self.round_trip_s - inside)


@dataclasses.dataclass
class Totals:
    """Sums over the steps of one kind; per-stage and per-hop lists grow as needed."""

    count: int = 0
    round_trip_s: float = 0.0
    wire_s: float = 0.0
    head_s: float = 0.0
    wait_s: list[float] = dataclasses.field(default_factory=list)
    compute_s: list[float] = dataclasses.field(default_factory=list)
    send_wait_s: list[float] = dataclasses.field(default_factory=list)

    def add(self, times: StepTimes) -> None:
        self.count += 1
        self.round_trip_s += times.round_trip_s
        self.wire_s += times.wire_s
        self.head_s += times.head_s
        for totals, values in ((self.wait_s, times.wait_s), (self.compute_s, times.compute_s),
                               (self.send_wait_s, times.send_wait_s)):
            if len(totals) < len(values):
                totals.extend([0.0] * (len(values) - len(totals)))
            for i, seconds in enumerate(values):
                totals[i] += seconds

    def means(self) -> dict:
        """Mean seconds per step: round_trip, wire, head, and wait/compute/send_wait lists."""
        n = max(1, self.count)
        return {"steps": self.count, "round_trip": self.round_trip_s / n,
                "wire": self.wire_s / n, "head": self.head_s / n,
                "wait": [s / n for s in self.wait_s],
                "compute": [s / n for s in self.compute_s],
                "send_wait": [s / n for s in self.send_wait_s]}


class StepBreakdown:
    def __init__(self) -> None:
        self.totals = {kind: Totals() for kind in KINDS}
        self._recent = {kind: collections.deque(maxlen=RECENT_STEPS) for kind in KINDS}

    def record(self, plan: StepPlan, times: StepTimes) -> None:
        kind = step_kind(plan)
        self.totals[kind].add(times)
        self._recent[kind].append(times)

    def reset(self) -> None:
        """A new route: its stages and hops are not the old ones."""
        self.__init__()

    def recent_means(self, kind: str = "decode") -> dict:
        """Mean times of the latest ``RECENT_STEPS`` steps of ``kind`` (see Totals.means)."""
        window = Totals()
        for times in self._recent[kind]:
            window.add(times)
        return window.means()


def step_kind(plan: StepPlan) -> str:
    return "decode" if all(entry.num_tokens == 1 for entry in plan.batch) else "prefill"
