"""MicrobatchTuner: ``--num-microbatches auto`` from what the pipeline measures.

Each stage's step time is fitted online against the step's tokens (``fixed + per_token *
tokens``, least squares over recent steps); the hops report their measured latency,
bandwidth and bytes per activation row. Every few results the pure chooser
(``scheduler.microbatch_chooser``) re-decides, and the count moves only for a predicted
gain (hysteresis), not to and fro on measurement noise.
"""

from __future__ import annotations

import collections
import logging

from molink.scheduler.microbatch_chooser import (
    HopTiming,
    StageTiming,
    choose_num_microbatches,
    round_time_s,
)

logger = logging.getLogger(__name__)

DECIDE_EVERY = 8  # results between decisions (and steps measured before the first)
SWITCH_GAIN = 0.03  # the count changes only for a predicted 3 % shorter round


class StageFit:
    """A stage's step time as ``fixed + per_token * tokens``, fitted online (least squares
    over recent steps)."""

    def __init__(self, window: int = 64) -> None:
        self.samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)

    def add(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))

    def timing(self) -> StageTiming:
        n = len(self.samples)
        mean_x = sum(x for x, _ in self.samples) / n
        mean_y = sum(y for _, y in self.samples) / n
        var = sum((x - mean_x) ** 2 for x, _ in self.samples)
        slope = 0.0
        if var > 0:
            slope = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in self.samples) / var)
        fixed = max(0.0, mean_y - slope * mean_x)
        if fixed == 0.0 and mean_x > 0:  # noisy fit through the origin: all per-token
            slope = mean_y / mean_x
        return StageTiming(fixed, slope)


class MicrobatchTuner:
    def __init__(self) -> None:
        self.choice: int | None = None  # None: nothing measured yet
        self._fits: list[StageFit] = []
        self._previous_hops: list = []
        self._results_since_choice = 0

    def reset(self) -> None:
        """The pipeline changed: forget every measurement."""
        self.__init__()

    def record(self, tokens: int, timings: tuple[float, ...]) -> None:
        """One step's compute seconds per stage, pipeline order."""
        if len(timings) != len(self._fits):
            self._fits = [StageFit() for _ in timings]
        for fit, seconds in zip(self._fits, timings):
            fit.add(tokens, seconds)

    def predict_step_s(self, tokens: int) -> float | None:
        """Compute seconds of a step of ``tokens`` over every stage, as fitted (None: not
        measured yet)."""
        if not self._fits or not self._fits[0].samples:
            return None
        return sum(fit.timing().step_s(tokens) for fit in self._fits)

    def update(self, hops: list, num_requests: int, shared_cores: int | None) -> None:
        """After a result: re-decide every few results. ``hops``: the head's ``HopStats``."""
        self._results_since_choice += 1
        if (self._results_since_choice < DECIDE_EVERY or not self._fits
                or len(self._fits[0].samples) < DECIDE_EVERY):
            return
        self._results_since_choice = 0
        stages = [fit.timing() for fit in self._fits]
        timings = [HopTiming(h.latency_s, h.bandwidth_bps / 8, self._bytes_per_token(i, h))
                   for i, h in enumerate(hops) if h.bandwidth_bps > 0]
        self._previous_hops = hops
        requests = max(1, num_requests)
        choice = choose_num_microbatches(stages, timings, requests, shared_cores=shared_cores)
        if choice == self.choice:
            return
        if self.choice is not None:
            now, then = (round_time_s(stages, timings, requests, m, shared_cores)
                         for m in (choice, self.choice))
            if now > then * (1 - SWITCH_GAIN):
                return
        logger.info("micro-batches in flight: %s -> %d (measured: stages %s, hops %s)",
                    self.choice, choice,
                    ", ".join(f"{s.fixed_s * 1e3:.1f}+{s.per_token_s * 1e3:.3f}/tok ms"
                              for s in stages),
                    ", ".join(f"{h.latency_s * 1e3:.0f} ms/{h.bandwidth_bytes_per_s * 8e-6:.0f}"
                              f" Mbit/s" for h in timings))
        self.choice = choice

    def _bytes_per_token(self, index: int, hop) -> int:
        """Bytes per activation row on a hop since the last decision (the compression may
        have changed), else over its whole life; 16 for a hop that carries no rows."""
        bytes_sent, tokens = hop.bytes_sent, hop.tokens_sent
        if index < len(self._previous_hops):
            before = self._previous_hops[index]
            if hop.tokens_sent - before.tokens_sent > 0 and hop.bytes_sent >= before.bytes_sent:
                bytes_sent -= before.bytes_sent
                tokens -= before.tokens_sent
        return max(1, bytes_sent // tokens) if tokens > 0 else 16
