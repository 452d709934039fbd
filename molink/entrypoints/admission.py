"""Admission: bounds the requests (choices) waiting in the head, not yet running.

Before any choice of a request starts, the requests waiting in the head (queued in its
scheduler) plus the ones admitted here but not yet handed to the head must leave room for
all of the request's choices (each choice counts one), within ``max_waiting_requests``.
Otherwise the answer is at once a 503 "server overloaded" with ``Retry-After``; nothing of
the rejected request is left behind. A request with more choices than the whole limit could
never be admitted: it is a 400 naming ``n``.
"""

from __future__ import annotations

import collections
import math
import time

from molink.coordinator.prompts import RequestError

# As many as --max-num-seqs' default: one more full batch may wait behind the running one.
DEFAULT_MAX_WAITING_REQUESTS = 256
MAX_RETRY_AFTER_S = 60  # what the openai client still honours as a delay


class ServerOverloaded(Exception):
    """Too many requests wait in the head: a 503 with ``Retry-After``."""

    def __init__(self, num_waiting: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"server overloaded: {num_waiting} requests waiting (limit {limit}); "
                         "retry later")
        self.retry_after_s = retry_after_s


class Admission:
    """Counts what waits; ``admit`` before a request's choices start.

    ``num_pending`` counts the choices admitted here but not yet handed to the head: between
    the check and the moment a pump calls ``head.generate`` other requests are checked, and
    the scheduler does not know about these yet. ``head.generate`` adds its request to the
    scheduler in its first step, with no await before it, and a pump hands over (decrements
    ``num_pending``) in that same step, so ``num_waiting + num_pending`` never skips a choice.
    """

    WINDOW_S = 60.0  # departures older than this no longer describe the current rate

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_waiting_requests must be a positive integer, got {limit!r}")
        self.limit = limit
        self.num_pending = 0
        self.num_rejected = 0  # over the app's life
        self._departures: collections.deque[float] = collections.deque(maxlen=256)

    def num_waiting(self, head) -> int:
        scheduler = getattr(head, "scheduler", None)
        return (scheduler.num_waiting if scheduler is not None else 0) + self.num_pending

    def admit(self, head, num_choices: int, n: int) -> int:
        """Count ``num_choices`` as pending, or raise; -> how many were counted.

        Nothing is counted while the head has no scheduler (not ready): ``head.generate``
        then answers PipelineNotReady, the usual 503.
        """
        if num_choices > self.limit:
            raise RequestError(f"n ({n}) times the number of prompts ({num_choices // n}) is "
                               f"{num_choices} choices, more than this server lets wait at once "
                               f"(max_waiting_requests = {self.limit}): such a request could "
                               "never be admitted; lower n or split the prompts", "n")
        if getattr(head, "scheduler", None) is None:
            return 0
        waiting = self.num_waiting(head)
        if waiting + num_choices > self.limit:
            self.num_rejected += 1
            raise ServerOverloaded(waiting, self.limit,
                                   self.retry_after(waiting + num_choices - self.limit))
        self.num_pending += num_choices
        return num_choices

    def departed(self) -> None:
        """A handed-over request left the head (finished, failed or aborted)."""
        self._departures.append(time.monotonic())

    def retry_after(self, excess: int) -> int:
        """Seconds until about ``excess`` requests have left the waiting queue.

        Waiting requests start as running ones leave, so the queue drains at the rate
        requests have been leaving the head over the last minute; without such departures
        the estimate is 1 s (a rejection is cheap). Between 1 and MAX_RETRY_AFTER_S.
        """
        now = time.monotonic()
        while self._departures and now - self._departures[0] > self.WINDOW_S:
            self._departures.popleft()
        if not self._departures:
            return 1
        rate = len(self._departures) / max(now - self._departures[0], 1.0)  # per second
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(excess / rate)))
