"""LinkScheduler: what goes next on one outgoing link (pure logic, no I/O, no torch).

A decode payload is one token per request (small, latency-critical); a prefill payload is
every prompt token (up to ~1000x larger). Sent first-in first-out, one prefill blocks every
decode behind it. The rules, applied each time the link becomes free:

1. Decode payloads go first, oldest first.
2. Prefill activations are cut along the token dimension into chunks sized just in time:
   as many tokens as the measured bandwidth carries before the next decode payload is due
   (at least ``min_chunk_tokens``, and at least ``min_chunk_s`` of link time). When no
   decode is expected, a chunk still holds no more than ``max_wait_s`` of link time, so an
   unannounced decode waits at most that long (None: the whole rest goes). The floors
   exist because the next stage computes each chunk that reaches it alone as a step of its
   own, paying its fixed cost per step (reading its weights); on a fast link a chunk of a
   few tokens saves a waiting decode microseconds and costs the next stage milliseconds.
3. Aging: once a waiting prefill has been passed over by ``max_bypass`` decode payloads,
   one chunk of it goes ahead of waiting decodes, unless one of them already waited behind
   a chunk (that one goes first). So a decode payload never waits behind more than one
   chunk, and prefill always progresses: when decodes arrive no faster than the link sends
   them, at most ``max_bypass`` pass a waiting prefill in a row.

    link:  D D [P0..P127] D D D [P128..P255] D ...   (D: decode payload, P: prefill chunk)
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class Payload:
    payload_id: int
    is_prefill: bool
    num_tokens: int
    bytes_per_token: int
    sent_tokens: int = 0  # prefill progress
    bypassed: int = 0  # decode payloads sent ahead of it while it waited

    @property
    def remaining_tokens(self) -> int:
        return self.num_tokens - self.sent_tokens


@dataclass(frozen=True)
class Send:
    payload_id: int
    is_prefill: bool
    start_token: int  # [start_token, start_token + num_tokens) of the payload
    num_tokens: int
    num_bytes: int
    last: bool  # the payload is complete after this send


@dataclass
class LinkScheduler:
    bandwidth_bps: float  # measured; updated by the caller as measurements change
    min_chunk_tokens: int = 16
    max_bypass: int = 4
    max_chunk_tokens: int | None = None  # hard cap (wins over min_chunk_tokens)
    max_wait_s: float | None = 0.05  # chunk bound when no decode is expected
    min_chunk_s: float = 0.0  # a chunk carries at least this much link time
    _decodes: collections.deque = field(default_factory=collections.deque)
    _prefills: collections.deque = field(default_factory=collections.deque)
    _last_was_chunk: bool = False
    _num_decodes_behind_chunk: int = 0

    def __post_init__(self) -> None:
        if (self.bandwidth_bps <= 0 or self.min_chunk_tokens < 1 or self.max_bypass < 0
                or (self.max_chunk_tokens is not None and self.max_chunk_tokens < 1)
                or self.min_chunk_s < 0):
            raise ValueError("bandwidth_bps > 0, min_chunk_tokens >= 1, max_bypass >= 0, "
                             "max_chunk_tokens >= 1 (or None) and min_chunk_s >= 0 needed")

    def enqueue(self, payload: Payload) -> None:
        if payload.is_prefill:
            self._prefills.append(payload)
            return
        if self._last_was_chunk:  # it may be arriving while that chunk is on the wire
            self._num_decodes_behind_chunk = len(self._decodes) + 1
        self._decodes.append(payload)

    @property
    def idle(self) -> bool:
        return not self._decodes and not self._prefills

    def next_send(self, seconds_until_next_decode: float | None) -> Send | None:
        """The next transmission; ``seconds_until_next_decode``: when the next decode payload
        is expected (None: none expected). Returns None when nothing waits."""
        prefill = self._prefills[0] if self._prefills else None
        forced = (prefill is not None and prefill.bypassed >= self.max_bypass
                  and not self._last_was_chunk and self._num_decodes_behind_chunk == 0)
        if self._decodes and not forced:
            return self._send_decode(prefill)
        if prefill is not None:
            return self._send_chunk(prefill, seconds_until_next_decode)
        return None

    def _send_decode(self, waiting_prefill: Payload | None) -> Send:
        payload = self._decodes.popleft()
        self._num_decodes_behind_chunk = max(0, self._num_decodes_behind_chunk - 1)
        if waiting_prefill is not None:
            waiting_prefill.bypassed += 1
        self._last_was_chunk = False
        return Send(payload.payload_id, False, 0, payload.num_tokens,
                    payload.num_tokens * payload.bytes_per_token, last=True)

    def _send_chunk(self, payload: Payload, seconds_until_next_decode: float | None) -> Send:
        num_tokens = self._chunk_tokens(payload, seconds_until_next_decode)
        start = payload.sent_tokens
        payload.sent_tokens += num_tokens
        payload.bypassed = 0
        last = payload.remaining_tokens == 0
        if last:
            self._prefills.popleft()
        self._last_was_chunk = True
        # Every decode waiting now waits behind this chunk: it must not wait behind another.
        # (They leave oldest first, so the marked ones are always a prefix of the queue.)
        self._num_decodes_behind_chunk = len(self._decodes)
        return Send(payload.payload_id, True, start, num_tokens,
                    num_tokens * payload.bytes_per_token, last=last)

    def _chunk_tokens(self, payload: Payload, seconds_until_next_decode: float | None) -> int:
        """Just in time: what the link carries before the next decode is due."""
        cap = min(payload.remaining_tokens, self.max_chunk_tokens or payload.remaining_tokens)
        if seconds_until_next_decode is None and not self._decodes:
            if self.max_wait_s is None:
                return cap
            seconds_until_next_decode = self.max_wait_s
        gap = max(0.0, seconds_until_next_decode or 0.0, self.min_chunk_s)
        fits = int(gap * self.bandwidth_bps / 8 // payload.bytes_per_token)
        return min(cap, max(self.min_chunk_tokens, fits))
