"""LinkMeter: what one hop's link can carry, measured from the sender's own traffic.

The link is probed when the route is set up (two empty and two large messages, one at a
time), then kept current from the acknowledgements of real traffic::

    small message (<= 8 KiB) acknowledged after rtt   -> latency   <- ewma(rtt / 2)
    large message (>= 32 KiB) acknowledged after t    -> bandwidth <- ewma(bytes / (t - rtt))

Only messages written onto an idle link count: one that waited behind earlier bytes says
nothing clean about either. The meter also keeps the rhythm of decode traffic (when the
next decode part is due), which the link scheduler uses to leave room for it, and names the
wire compression it applies (``auto`` is lossless: the model's own dtype).
"""

from __future__ import annotations

from molink.ewma import ewma
from molink.messages import LinkReport

INITIAL_BANDWIDTH_BPS = 1e9  # assumed until the first measurement
MAX_BANDWIDTH_BPS = 1e11  # beyond this, measurements on one machine are noise
SMALL_BYTES = 8 * 1024  # acks of messages this small measure latency
LARGE_BYTES = 32 * 1024  # acks of messages this large measure bandwidth


class LinkMeter:
    def __init__(self) -> None:
        self.link = LinkReport(bandwidth_bps=0.0, latency_s=0.0, compression="none")
        self._last_decode_at: float | None = None
        self._decode_interval_s: float | None = None

    @property
    def bandwidth_bps(self) -> float:
        """The measured bandwidth, or the initial assumption before any measurement."""
        return self.link.bandwidth_bps or INITIAL_BANDWIDTH_BPS

    def probed(self, small_rtt_s: float, large_rtt_s: float, large_bytes: int) -> None:
        """The probe's best round trips: latency from the small, bandwidth from how much
        longer the large took."""
        self.link.latency_s = small_rtt_s / 2
        self.link.bandwidth_bps = min(MAX_BANDWIDTH_BPS,
                                      large_bytes * 8 / max(large_rtt_s - small_rtt_s, 1e-9))

    def acknowledged(self, num_bytes: int, elapsed_s: float) -> bool:
        """A message written onto an idle link came back after ``elapsed_s``; True when
        the bandwidth estimate changed."""
        if num_bytes <= SMALL_BYTES:
            rtt = max(0.0, elapsed_s - num_bytes * 8 / self.bandwidth_bps)
            self.link.latency_s = ewma(self.link.latency_s, rtt / 2)
        elif num_bytes >= LARGE_BYTES:
            transfer = elapsed_s - 2 * self.link.latency_s
            if transfer > 0.1 * elapsed_s:
                sample = min(MAX_BANDWIDTH_BPS, num_bytes * 8 / transfer)
                self.link.bandwidth_bps = ewma(self.link.bandwidth_bps, sample)
                return True
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
