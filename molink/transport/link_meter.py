"""LinkMeter: what one hop's link can carry, measured from the sender's own traffic.

The link is probed when the route is set up (two empty and two large messages, one at a
time), then kept current from the acknowledgements of real traffic::

    small message (<= 8 KiB) acknowledged after rtt   -> latency   <- ewma(rtt / 2)
    large message (>= 32 KiB) acknowledged after t    -> bandwidth <- ewma(bytes / (t - rtt))
    while the link is kept busy: delivery rate        -> bandwidth <- max over a window

The first two count only messages written onto an idle link (one that waited behind earlier
bytes says nothing clean about either); every idle-link round trip also holds the time
gRPC and the event loops take, so they read a link a little slower than it is. A sender
pacing itself to such an estimate would never learn better: its own pace is all the acks
show. So, as BBR does, the meter also samples the *delivery rate* (bytes acknowledged over
the time they took to be acknowledged, and never faster than they were sent) and paces in
a cycle of gains: a phase at 1.25x the estimate (if the link can carry more, the acks now
arrive faster and a sample shows it), one at 0.75x (draining the queue that phase left in
socket buffers, where the link scheduler cannot reorder it), six at 1x. The estimate is the
largest measurement of the last two cycles, delivery rates and idle-link ones alike (with
none, an idle link, the last estimate). And the sender holds back while two
bandwidth-delay products and a message are unacknowledged (as BBR caps what is in flight):
enough for a message's own transfer, the round trip and a receiver slow to acknowledge
while it computes, so the cap does not throttle a link that pacing keeps busy, while a link
that slows down (another flow, a relay running late) cannot pile up much more than a round
trip of bytes ahead of the next decode.

The meter also keeps the rhythm of decode traffic (when the next decode part is due), which
the link scheduler uses to leave room for it, and names the wire compression it applies
(``auto`` is lossless: the model's own dtype).
"""

from __future__ import annotations

import collections
import dataclasses

from molink.ewma import ewma
from molink.messages import LinkReport

INITIAL_BANDWIDTH_BPS = 1e9  # assumed until the first measurement
MAX_BANDWIDTH_BPS = 1e11  # beyond this, measurements on one machine are noise
SMALL_BYTES = 8 * 1024  # acks of messages this small measure latency
LARGE_BYTES = 32 * 1024  # acks of messages this large measure bandwidth
PACING_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # one cycle, a phase per round trip
MIN_PHASE_S = 0.02
LATE_CREDIT_S = 0.01  # a send this late on its pace may catch up (a burst of this long)
WINDOW_CYCLES = 2  # the delivery rate is the largest sample of this many cycles
IN_FLIGHT_BDPS = 2.0  # unacknowledged bytes allowed: bandwidth-delay products, plus
MIN_IN_FLIGHT_BYTES = 64 * 1024  # the largest recent message (and never less than this)
RECENT_MESSAGES = 16


@dataclasses.dataclass(frozen=True)
class SendState:
    """What the meter knew when a message was written (for its delivery-rate sample)."""
    delivered: int  # bytes acknowledged by then
    delivered_at: float  # when the last of them was (or, on an idle link, the write)
    first_sent_at: float  # when the last of them was written
    app_limited: bool  # nothing else was waiting: the sample shows the sender's pace


class LinkMeter:
    def __init__(self) -> None:
        self.link = LinkReport(bandwidth_bps=0.0, latency_s=0.0, compression="none")
        self._last_decode_at: float | None = None
        self._decode_interval_s: float | None = None
        self._idle_bps = 0.0  # the probe's and the idle-link acks' estimate
        self._delivered = 0
        self.in_flight_bytes = 0
        self._recent_sizes: collections.deque[int] = collections.deque(maxlen=RECENT_MESSAGES)
        self._delivered_at = self._first_sent_at = 0.0
        self._rates: collections.deque[tuple[float, float]] = collections.deque()  # (at, bps)

    @property
    def bandwidth_bps(self) -> float:
        """The measured bandwidth, or the initial assumption before any measurement."""
        return self.link.bandwidth_bps or INITIAL_BANDWIDTH_BPS

    def _phase_s(self) -> float:
        return max(MIN_PHASE_S, 2 * self.link.latency_s)


    def paced_until(self, free_at: float, now: float, num_bytes: int) -> float:
        """When a message of ``num_bytes`` written now is through the link, as pacing
        counts (``free_at``: when the earlier ones are), at the gain of each phase it spans
        (a message longer than a phase is not paced at its first phase's gain throughout).
        A sender that wakes up a little late continues from where it should have been: its
        timers' lateness is not taken from the link (else it paces below the estimate, and
        the delivery rate it then sees pulls the estimate down after it)."""
        t = free_at if 0.0 <= now - free_at <= LATE_CREDIT_S else max(now, free_at)
        bits = num_bytes * 8
        phase_s = self._phase_s()
        cycle_s = phase_s * len(PACING_GAINS)
        mean_gain = sum(PACING_GAINS) / len(PACING_GAINS)
        cycles = int(bits // (self.bandwidth_bps * mean_gain * cycle_s))
        t += cycles * cycle_s  # whole cycles: at their mean gain
        bits = max(0.0, bits - cycles * self.bandwidth_bps * mean_gain * cycle_s)
        phase = int(t / phase_s)
        while True:  # the rest phase by phase: each at its own gain (a cycle at most)
            rate = PACING_GAINS[phase % len(PACING_GAINS)] * self.bandwidth_bps
            phase += 1
            room = rate * max(0.0, phase * phase_s - t)
            if bits <= room:
                return t + bits / rate
            bits -= room
            t = phase * phase_s

    def window_full(self) -> bool:
        """Enough is unacknowledged to keep the link busy: wait for an ack before more."""
        bdp = self.bandwidth_bps * 2 * self.link.latency_s / 8
        largest = max(self._recent_sizes, default=0)
        return self.in_flight_bytes >= max(MIN_IN_FLIGHT_BYTES, IN_FLIGHT_BDPS * bdp + largest)

    def sent(self, now: float, num_bytes: int, app_limited: bool) -> SendState:
        """A message of ``num_bytes`` is written now."""
        if not self.in_flight_bytes:  # the link was idle: the interval starts now
            self._delivered_at = self._first_sent_at = now
        self.in_flight_bytes += num_bytes
        self._recent_sizes.append(num_bytes)
        return SendState(self._delivered, self._delivered_at, self._first_sent_at, app_limited)

    def delivered(self, state: SendState | None, num_bytes: int, sent_at: float,
                  now: float) -> bool:
        """The message written at ``sent_at`` (``state``: the meter's then; None for one
        sent again on a new stream) is acknowledged now; True when the estimate changed.

        Its sample: the bytes acknowledged since it was written, over the longer of the
        time they took to be acknowledged and the time they took to be written (acks that
        arrive bunched do not make a link look faster than it was fed). A sample spanning
        less than a round trip is dropped (bunched acks again), as is an app-limited one
        below the estimate (it shows the sender's pace, not the link's)."""
        self._delivered += num_bytes
        self.in_flight_bytes = max(0, self.in_flight_bytes - num_bytes)
        self._delivered_at, self._first_sent_at = now, sent_at
        if state is None:
            return False
        interval = max(sent_at - state.first_sent_at, now - state.delivered_at)
        if interval <= 0 or interval < 2 * self.link.latency_s:
            return False
        rate = min(MAX_BANDWIDTH_BPS, (self._delivered - state.delivered) * 8 / interval)
        if state.app_limited and rate <= self.bandwidth_bps:
            return False
        self._rates.append((now, rate))
        return self._update(now)

    def _update(self, now: float) -> bool:
        window = WINDOW_CYCLES * len(PACING_GAINS) * self._phase_s()
        while self._rates and self._rates[0][0] < now - window:
            self._rates.popleft()
        before = self.link.bandwidth_bps
        if self._rates:  # else (an idle link) the last estimate stands
            self.link.bandwidth_bps = max(rate for _, rate in self._rates)
        return self.link.bandwidth_bps != before

    def probed(self, small_rtt_s: float, large_rtt_s: float, large_bytes: int,
               now: float) -> None:
        """The probe's best round trips: latency from the small, bandwidth from how much
        longer the large took (held as a delivery rate for a window, so the first round
        trip of traffic, which fills the link, does not pull it down)."""
        self.link.latency_s = small_rtt_s / 2
        self._idle_bps = min(MAX_BANDWIDTH_BPS,
                             large_bytes * 8 / max(large_rtt_s - small_rtt_s, 1e-9))
        self._rates.append((now, self._idle_bps))
        self._update(now)

    def acknowledged(self, num_bytes: int, elapsed_s: float, now: float = 0.0) -> bool:
        """A message written onto an idle link came back after ``elapsed_s`` (at ``now``);
        True when the bandwidth estimate changed."""
        if num_bytes <= SMALL_BYTES:
            rtt = max(0.0, elapsed_s - num_bytes * 8 / self.bandwidth_bps)
            self.link.latency_s = ewma(self.link.latency_s, rtt / 2)
        elif num_bytes >= LARGE_BYTES:
            transfer = elapsed_s - 2 * self.link.latency_s
            if transfer > 0.1 * elapsed_s:
                sample = min(MAX_BANDWIDTH_BPS, num_bytes * 8 / transfer)
                self._idle_bps = ewma(self._idle_bps, sample) if self._idle_bps else sample
                # a measurement like a delivery rate, for as long: a link kept barely busy
                # (a message sent while a small one is in flight) has delivery rates that
                # span a round trip and read it low
                self._rates.append((now, self._idle_bps))
                return self._update(now)
        return False

    def note_decode(self, now: float) -> None:
        """A decode part was submitted now."""
        if self._last_decode_at is not None:
            gap = now - self._last_decode_at
            self._decode_interval_s = gap if self._decode_interval_s is None else (
                ewma(self._decode_interval_s, gap))
        self._last_decode_at = now

    def seconds_until_next_decode(self, now: float) -> float | None:
        """When the next decode part is expected (None: no decode traffic lately)."""
        if self._decode_interval_s is None or self._last_decode_at is None:
            return None
        since = now - self._last_decode_at
        if since > 3 * self._decode_interval_s + 0.1:
            return None
        return max(0.0, self._decode_interval_s - since)

    def wire_compression(self, configured: str, native_dtype: str) -> str:
        """The encoding to apply now, reported as the hop's compression: ``auto`` is lossless
        (the model's own dtype on the wire; see ``molink.messages.is_lossy``), a lossy
        encoding is used only when configured, and a cast to the activations' own dtype is
        reported as ``none`` (it changes nothing)."""
        choice = "none" if configured == "auto" or configured == native_dtype else configured
        self.link.compression = choice
        return choice
