"""What the head's engine loop counts (``HeadStats``), and the pauses of replayed requests
(``Replays``): both read by ``/metrics`` and the tests."""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass
class HeadStats:
    num_steps_dispatched: int = 0
    num_steps_completed: int = 0
    max_microbatches_in_flight: int = 0
    num_requests_in_two_microbatches: int = 0  # must stay 0
    num_stage_failures: int = 0
    num_steps_timed_out: int = 0
    num_route_failures: int = 0  # routes that could not be set up (then retried)
    activation_bytes_sent: int = 0  # on the head's outgoing hop
    activation_tokens_sent: int = 0
    num_results_out_of_order: int = 0  # a later micro-batch finished first
    num_failovers: int = 0  # suspensions (a stage lost, its requests kept for replay)
    num_requests_replayed: int = 0  # running requests whose KV was rebuilt on a new route
    num_replays_done: int = 0  # ... of which generated their next token since
    replay_pause_s_total: float = 0.0  # sum over those: loss -> the next token
    replay_pause_s_max: float = 0.0


class Replays:
    """Requests whose KV was lost with a stage and is rebuilt on the next route: when each
    lost it, and how long each paused (loss -> its next token), into ``stats``."""

    def __init__(self, stats: HeadStats) -> None:
        self.stats = stats
        self._lost_at: dict[str, float] = {}  # request id -> when its KV was lost

    def lost(self, request_id: str) -> None:
        self.stats.num_requests_replayed += 1
        self._lost_at.setdefault(request_id, time.monotonic())

    def delivered(self, requests) -> None:
        """``requests`` got a token: those being replayed are back."""
        if not self._lost_at:
            return
        now = time.monotonic()
        for request in requests:
            lost_at = self._lost_at.pop(request.request_id, None)
            if lost_at is not None:
                pause = now - lost_at
                self.stats.num_replays_done += 1
                self.stats.replay_pause_s_total += pause
                self.stats.replay_pause_s_max = max(self.stats.replay_pause_s_max, pause)

    def forget(self, request_id: str) -> None:
        self._lost_at.pop(request_id, None)

    def clear(self) -> None:
        self._lost_at.clear()
