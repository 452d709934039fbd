"""MicrobatchTrials: ``--num-microbatches auto`` checks its model against what each count
really delivers, and never keeps a count that measures worse than one micro-batch.

The chooser's model (``scheduler.microbatch_chooser``) leaves out what it cannot see per
hop: the head's own work, serialization, relays, other processes on the stages' cores; and
its fit of fixed against per-token step cost is only as good as the step sizes it saw,
which the count it chose decides (many small micro-batches: every step the same size, the
fixed cost unidentified, more micro-batches look free). On one machine's 2 cores that made
auto slower than one micro-batch at a time. So, for each load level (decoding requests,
in powers of two), each candidate count (``candidates``, then the best one's neighbours
until none is better) is held for a window and scored by tokens delivered per request-second
(the inverse of the mean inter-token time: it does not reward a count for merely having
more requests waiting); the best measured count is used at that load. A load level's
candidates are fixed when it is first seen (only counts the model predicts within
``PLAUSIBLE`` of its best round: a trial of a count the model knows is far worse, one
micro-batch over slow links to GPUs, costs more than it can find) and its decision, once every candidate is
measured, holds for ``HOLD_S`` (no re-measuring meanwhile: a count measured under a burst
of prompts would compare unfairly with one measured without); then it is measured again. A window starts one round after a switch (plans
of the old count drain first) and lasts at least ``WINDOW_S`` and ``WINDOW_ROUNDS`` rounds.
After a switch the window also waits, up to ``PREFILL_SETTLE_S``, until no request is
being prefilled: a load level is first reached while its burst of prompts is still being
prefilled, and the first count measured then looked worse than the next one, measured in
plain decode (a wave of 16 prompts on 3 stages: the model's 2 micro-batches, which deliver
0.79x one process where 1 delivers 0.75x, measured 12.9 tokens per request-second during
the prompts and were dropped for 1). Under a steady mix of arrivals the wait ends at
``PREFILL_SETTLE_S`` and every count is measured under the same mix.
"""

from __future__ import annotations

import math

from molink.scheduler.microbatch_chooser import MAX_MICROBATCHES

WINDOW_S = 2.0
PLAUSIBLE = 1.25  # counts predicted this much slower than the best are not tried
WINDOW_ROUNDS = 6  # every decoding request got this many tokens, on average
HOLD_S = 300.0  # a load level's measurements stand this long, then are redone
PREFILL_SETTLE_S = 2.0  # the longest a window waits for prompts to be prefilled


def candidates(model_choice: int, limit: int = MAX_MICROBATCHES) -> list[int]:
    """What is tried: the model's choice, one micro-batch, their geometric middle, and twice
    the model's choice (the model leaves out costs it cannot see per hop, so it tends to
    under-fill a pipeline whose links dominate), at most ``limit`` (the decoding requests)."""
    middle = round(math.sqrt(model_choice))
    return list(dict.fromkeys([model_choice, 1, *([middle] if 1 < middle < model_choice else []),
                               max(1, min(limit, MAX_MICROBATCHES, 2 * model_choice))]))


def load_level(decoding: int) -> int:
    """1, 2-3, 4-7, 8-15, ... decoding requests: one level each."""
    return max(1, decoding).bit_length()


class MicrobatchTrials:
    def __init__(self) -> None:
        self.rates: dict[int, dict[int, float]] = {}  # level -> count -> tokens/request-s
        self._measured_at: dict[int, float] = {}  # level -> its first measurement
        self._tried: dict[int, list[int]] = {}  # level -> its candidates (fixed when first seen)
        self._level = 0
        self._count = 0  # the count the current window measures
        self._settle_tokens = 0  # tokens to let pass before the window opens
        self._open = False  # the window measures (settled, and no prompt in the way)
        self._restarted_at = self._opened_at = self._last = 0.0
        self._tokens = 0
        self._request_s = 0.0

    def observe(self, count: int, tokens: int, decoding: int, model_choice: int,
                now: float, plausible=lambda count: True, prefilling: int = 0) -> int:
        """After a result: ``count`` was in force, the result delivered ``tokens`` while
        ``decoding`` requests decode and ``prefilling`` wait for (the rest of) their
        prompts. -> the count to use from now on."""
        level = self._level_of(decoding)
        if now - self._measured_at.get(level, now) > HOLD_S:
            for table in (self.rates, self._measured_at, self._tried):
                table.pop(level, None)
        tried = self._tried.setdefault(level, [c for c in candidates(model_choice, decoding)
                                               if c == model_choice or plausible(c)])
        rates = self.rates.setdefault(level, {})
        if self._refine(tried, rates, decoding, plausible):
            return self._next(rates, count, tried)  # decided: holds until HOLD_S
        if level != self._level or count != self._count:
            self._restart(level, count, now, settle=decoding)
        elif not self._open:
            self._settle_tokens -= tokens
            if self._settle_tokens <= 0 and (
                    not prefilling or now - self._restarted_at >= PREFILL_SETTLE_S):
                self._open = True
                self._opened_at = self._last = now
        else:
            self._tokens += tokens
            self._request_s += decoding * (now - self._last)
            self._last = now
            if (now - self._opened_at >= WINDOW_S and self._request_s > 0
                    and self._tokens >= WINDOW_ROUNDS * decoding):
                rates[count] = self._tokens / self._request_s
                self._measured_at.setdefault(level, now)
                self._restart(level, count, now, settle=0)
                self._refine(tried, rates, decoding, plausible)
        return self._next(rates, count, tried)

    @property
    def current_rates(self) -> dict[int, float]:
        """What each count measured at the current load level."""
        return self.rates.get(self._level, {})

    def _level_of(self, decoding: int) -> int:
        """The load level, kept while the decoding requests stay within a quarter of its
        bounds (a load that sits on a boundary, 32 requests finishing and starting, must
        not flip between two levels and their trials)."""
        level = self._level
        if level and 0.75 * 2 ** (level - 1) <= decoding < 1.25 * 2 ** level:
            return level
        return load_level(decoding)

    @staticmethod
    def _refine(tried: list[int], rates: dict[int, float], limit: int, plausible) -> bool:
        """Once every count tried is measured, try the best one's neighbours (a quarter of
        it, at least 1, either way) until it has no better neighbour. -> True when
        decided."""
        if any(c not in rates for c in tried):
            return False
        best = max(tried, key=lambda c: rates[c])
        step = max(1, best // 4)
        neighbours = [max(1, best - step), max(1, min(limit, MAX_MICROBATCHES, best + step))]
        fresh = [n for n in neighbours if n not in tried and plausible(n)]
        tried.extend(fresh)
        return not fresh

    @staticmethod
    def _next(rates: dict[int, float], count: int, tried: list[int]) -> int:
        untried = [c for c in tried if c not in rates]
        if untried:
            return count if count in untried else untried[0]
        return max(tried, key=lambda c: rates[c])  # stable: rates are frozen once decided

    def _restart(self, level: int, count: int, now: float, settle: int) -> None:
        """A new window for ``count``; with ``settle`` (a switch) it opens once that many
        tokens went by and no prompt is being prefilled (or ``PREFILL_SETTLE_S`` passed)."""
        self._level, self._count, self._settle_tokens = level, count, settle
        self._open = settle <= 0
        self._restarted_at = self._opened_at = self._last = now
        self._tokens, self._request_s = 0, 0.0
