"""MicrobatchTuner: ``--num-microbatches auto`` from what the pipeline measures.

Each stage's step time is fitted online against the step's tokens (``fixed + per_token *
tokens``, least squares over recent steps); the hops report their measured latency,
bandwidth and bytes per activation row. Every few results the pure chooser
(``scheduler.microbatch_chooser``) re-decides, and its choice moves only for a predicted
gain (hysteresis), not to and fro on measurement noise. The count used is the one that
measures best among the model's choice and one micro-batch (``microbatch_trials``).
"""

from __future__ import annotations

import logging
import time

from molink.coordinator.microbatch_trials import PLAUSIBLE, MicrobatchTrials
from molink.ewma import ewma
from molink.scheduler.microbatch_chooser import (
    MAX_MICROBATCHES,
    HopTiming,
    StageFit,
    StageTiming,
    choose_num_microbatches,
    round_time_s,
)
from molink.scheduler.stall_bound import prefill_chunk_tokens

logger = logging.getLogger(__name__)

DECIDE_EVERY = 8  # results between decisions (and steps measured before the first)
SWITCH_GAIN = 0.03  # the count changes only for a predicted 3 % shorter round


class MicrobatchTuner:
    def __init__(self) -> None:
        self.choice: int | None = None  # in force (None: nothing measured yet)
        self.model_choice: int | None = None  # what the chooser's model predicts is best
        self.trials = MicrobatchTrials()  # what each candidate count measured
        self._plausible = lambda count: True  # counts worth a trial, as the model predicts
        self._fits: list[StageFit] = []
        self._previous_hops: list = []
        self._rounds: dict[int, float] = {}  # modelled decode round by count (cores not shared)
        self._results_since_choice = 0
        self._timings: list[StageTiming] | None = None  # the fits, until the next record
        self.stage_compute_s: list[float] = []  # EWMA per stage, pipeline order
        # prompt tokens the last plan could carry beside decodes (its budget, bound or not)
        self.prompt_tokens_allowed = 0

    def reset(self) -> None:
        """The pipeline changed: forget every measurement."""
        self.__init__()

    def record(self, plan, timings: tuple[float, ...]) -> None:
        """One step's compute seconds per stage, pipeline order: fitted against the step's
        tokens, and smoothed (EWMA) for display."""
        tokens = plan.num_tokens
        if len(timings) != len(self._fits):
            self._fits = [StageFit() for _ in timings]
            self.stage_compute_s = list(timings)
        self.stage_compute_s = [ewma(old, new) for old, new in zip(self.stage_compute_s, timings)]
        for fit, seconds in zip(self._fits, timings):
            fit.add(tokens, seconds)
        self._timings = None

    def stage_timings(self) -> list[StageTiming]:
        """Each stage's fitted step time, pipeline order ([]: nothing measured yet)."""
        if self._timings is None:
            self._timings = [fit.timing() for fit in self._fits if fit.samples]
        return self._timings

    def prefill_budget(self, factor: float, decoding: int, num_microbatches: int,
                       max_tokens: int) -> int | None:
        """Prompt tokens the next plan may carry while ``decoding`` requests decode (spread
        over ``num_microbatches``) without stalling them beyond ``factor`` decode steps per
        stage, or the round's share where links set it (``stall_bound``), from the fitted
        step times (None: no bound, nothing decodes or is measured)."""
        stages = self.stage_timings() if factor > 0 and decoding else []
        budget = None if not stages else prefill_chunk_tokens(
            stages, -(-decoding // num_microbatches), factor, max_tokens,
            round_s=self._rounds.get(num_microbatches))
        self.prompt_tokens_allowed = max_tokens if budget is None else budget
        return budget

    def predict_step_s(self, tokens: int) -> float | None:
        """Compute seconds of a step of ``tokens`` over every stage, as fitted (None: not
        measured yet)."""
        if not self._fits or not self._fits[0].samples:
            return None
        return sum(stage.step_s(tokens) for stage in self.stage_timings())

    def update(self, hops: list, num_requests: int, shared_cores: int | None,
               tokens: int = 0, decoding: int | None = None, now: float | None = None,
               prefilling: int = 0) -> None:
        """After a result that delivered ``tokens`` (``decoding``: requests that get one
        each round; ``prefilling``: requests waiting for their prompts): the model
        re-decides every few results (``hops``: the head's ``HopStats``), the trials
        measure what the count in force delivers and pick the count to use."""
        requests = max(1, num_requests)
        self._results_since_choice += 1
        if (self._results_since_choice >= DECIDE_EVERY and self._fits
                and len(self._fits[0].samples) >= DECIDE_EVERY):
            self._results_since_choice = 0
            self._model_decides(hops, requests, shared_cores)
        if self.model_choice is None:
            return
        decoding = requests if decoding is None else decoding
        if decoding < 1:
            return  # nothing decodes: no rate to measure
        choice = self.trials.observe(self.choice or self.model_choice, tokens, decoding,
                                     self.model_choice, time.monotonic() if now is None else now,
                                     self._plausible, prefilling)
        if choice != self.choice:
            logger.info("micro-batches in flight: %s -> %d (model: %d; measured tokens per "
                        "request-second: %s)", self.choice, choice, self.model_choice,
                        ", ".join(f"{m}: {r:.1f}"
                                  for m, r in sorted(self.trials.current_rates.items()))
                        or "none yet")
            self.choice = choice

    def _model_decides(self, hops: list, requests: int, shared_cores: int | None) -> None:
        stages = self.stage_timings()
        timings = [HopTiming(h.latency_s, h.bandwidth_bps / 8, self._bytes_per_token(i, h))
                   for i, h in enumerate(hops) if h.bandwidth_bps > 0]
        self._previous_hops = hops
        rounds = {m: round_time_s(stages, timings, requests, m, shared_cores)
                  for m in range(1, MAX_MICROBATCHES + 1)}
        self._plausible = lambda m: rounds.get(m, float("inf")) <= PLAUSIBLE * min(rounds.values())
        self._rounds = {} if shared_cores else rounds  # shared cores: stall unit = a step
        choice = choose_num_microbatches(stages, timings, requests, shared_cores=shared_cores)
        if choice == self.model_choice:
            return
        if self.model_choice is not None and (
                rounds[choice] > rounds[self.model_choice] * (1 - SWITCH_GAIN)):
            return
        logger.info("modelled micro-batch count: %s -> %d (measured: stages %s, hops %s)",
                    self.model_choice, choice,
                    ", ".join(f"{s.fixed_s * 1e3:.1f}+{s.per_token_s * 1e3:.3f}/tok ms"
                              for s in stages),
                    ", ".join(f"{h.latency_s * 1e3:.0f} ms/{h.bandwidth_bytes_per_s * 8e-6:.0f}"
                              f" Mbit/s" for h in timings))
        self.model_choice = choice

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
