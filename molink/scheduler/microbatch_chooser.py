"""How many micro-batches to keep in flight, from measured stage and hop timings.

Pure arithmetic on measurements (no torch, no I/O). ``R`` requests decode in ``m``
micro-batches of ``b = R / m``; each round every request gets one token::

    cycle(b)  = sum_i t_i(b) + sum_j (latency_j + b * bytes_per_token_j / bandwidth_j)
    busy(b)   = max( max_i t_i(b), max_j b * bytes_per_token_j / bandwidth_j )
    round(m)  = max( cycle(b), m * busy(b) )

``cycle`` is one micro-batch's trip round the pipeline; ``m * busy`` is the busiest
resource's work per round. With fewer micro-batches than ``cycle / busy`` every resource
idles while activations travel (round = cycle); with more, each micro-batch is smaller
and fixed per-step costs (``t_i(b) = fixed_i + per_token_i * b``, e.g. reading the
weights) are paid more often for nothing. The smallest m with the shortest predicted round
(about where ``m * busy(R / m)`` meets ``cycle(R / m)``) sits on a knife edge: the cycle leaves out what
is not measured per hop (the head's scheduling, serialization, relays), about 15 % of a
round over 100 Mbit links in ``benchmarks/results/weak_links_headline.md``, so there it
under-fills the pipeline. The chooser takes the largest count up to twice that smallest
whose predicted round is no longer than the smallest's (within ``slack``): where the
bottleneck has no fixed cost per step (a link) the extra micro-batches are free headroom;
where it has one (a stage reading its weights) they are not, and the count stays. When
stages share one machine's cores (CPU-only runs), the machine is a resource too: sum of
stage times / cores.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

MAX_MICROBATCHES = 16  # the most plans auto keeps in flight


@dataclass(frozen=True)
class StageTiming:
    """Measured step time of one stage: ``fixed_s + per_token_s * tokens``."""

    fixed_s: float
    per_token_s: float

    def step_s(self, tokens: float) -> float:
        return self.fixed_s + self.per_token_s * tokens


class StageFit:
    """A stage's step time as ``fixed + per_token * tokens``, fitted online (least squares
    over recent steps).

    The first step a fit sees is left out: it pays one-time costs (allocations, kernels
    chosen on first use, cold caches) and made a stage's second, larger step look cheaper
    than its first (a negative slope: no stall bound for the prompt that came next). Steps
    of one size cannot tell the fixed cost from the per-token cost (e.g. a window of decode
    steps at a steady batch): the last per-token cost the window did show is kept, and
    before any, the whole step is counted per token, the cautious reading for the stall
    bound (small chunks, until a step of another size tells more)."""

    def __init__(self, window: int = 64) -> None:
        self.samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self._warmed_up = False
        self._known_slope: float | None = None  # the last per-token cost the window showed

    def add(self, tokens: int, seconds: float) -> None:
        if not self._warmed_up:
            self._warmed_up = True
            return
        self.samples.append((tokens, seconds))

    def timing(self) -> StageTiming:
        n = len(self.samples)
        mean_x = sum(x for x, _ in self.samples) / n
        mean_y = sum(y for _, y in self.samples) / n
        var = sum((x - mean_x) ** 2 for x, _ in self.samples)
        if var > 0:
            slope = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in self.samples) / var)
            if slope > 0:
                self._known_slope = slope
        elif self._known_slope is not None:
            slope = self._known_slope
        else:
            return StageTiming(0.0, mean_y / mean_x) if mean_x > 0 else StageTiming(mean_y, 0.0)
        fixed = max(0.0, mean_y - slope * mean_x)
        if fixed == 0.0 and mean_x > 0:  # a negative intercept: fit through the origin
            slope = (sum(x * y for x, y in self.samples)
                     / sum(x * x for x, _ in self.samples))
        return StageTiming(fixed, slope)


@dataclass(frozen=True)
class HopTiming:
    """Measured link of one hop."""

    latency_s: float
    bandwidth_bytes_per_s: float
    bytes_per_token: int

    def transfer_s(self, tokens: float) -> float:
        return tokens * self.bytes_per_token / self.bandwidth_bytes_per_s


def round_time_s(stages: list[StageTiming], hops: list[HopTiming], num_requests: int,
                 num_microbatches: int, shared_cores: int | None = None) -> float:
    """Seconds for every request to get one token with ``num_microbatches`` in flight."""
    cycle, busy = _cycle_and_busy(stages, hops, num_requests / num_microbatches, shared_cores)
    return max(cycle, num_microbatches * busy)


def choose_num_microbatches(stages: list[StageTiming], hops: list[HopTiming],
                            num_requests: int, max_microbatches: int = MAX_MICROBATCHES,
                            shared_cores: int | None = None, slack: float = 0.02) -> int:
    """The count to keep in flight (capped at the limit): the smallest whose predicted
    round is within ``slack`` of the shortest, or more, up to twice that, where the
    predicted round stays within ``slack`` of its (see the module docstring)."""
    if not stages or num_requests < 1:
        return 1
    limit = max(1, min(max_microbatches, num_requests))
    rounds = {m: round_time_s(stages, hops, num_requests, m, shared_cores)
              for m in range(1, limit + 1)}
    best = min(rounds.values())
    smallest = min(m for m, seconds in rounds.items() if seconds <= best * (1 + slack))
    chosen = smallest
    for m in range(smallest + 1, min(limit, 2 * smallest) + 1):
        if rounds[m] <= rounds[smallest] * (1 + slack):
            chosen = m
    return chosen


def _cycle_and_busy(stages, hops, tokens: float, shared_cores: int | None):
    steps = [s.step_s(tokens) for s in stages]
    transfers = [h.transfer_s(tokens) for h in hops]
    cycle = sum(steps) + sum(h.latency_s for h in hops) + sum(transfers)
    busy = max(steps + transfers)
    if shared_cores:
        busy = max(busy, sum(steps) / shared_cores)
    return cycle, busy
