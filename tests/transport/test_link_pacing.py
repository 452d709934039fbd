"""Pacing to a link learnt from its own acknowledgements (``LinkMeter``), on a simulated link.

A sender that paces to the bandwidth its idle-link acks show never learns better: those
acks also hold the receiver's and the event loops' time, so they read the link slower than
it is, and once paced to that estimate, its own pace is all the acks show (the weak-links
headline paced 100 Mbit/s links at 90.5). These tests run the meter against a model of a
link (a bottleneck of ``rate``, ``latency`` each way, a receiver that takes a while to ack)
with a sender that always has data, in simulated time, so what they check is arithmetic,
not the load on the machine.
"""

from __future__ import annotations

import dataclasses
import heapq

import pytest

from molink.transport import link_meter
from molink.transport.link_meter import IN_FLIGHT_BDPS, PACING_GAINS, LinkMeter

MESSAGE_BYTES = 64 * 1024
LATENCY_S = 0.02


@dataclasses.dataclass
class Run:
    meter: LinkMeter
    estimates: list[tuple[float, float]]  # (time, bandwidth estimate)
    delivered: list[tuple[float, int]]  # (time at the receiver, bytes)
    queue_delays: list[tuple[float, float]]  # (time, wait at the bottleneck)

    def estimate_at(self, t: float) -> float:
        return [bps for at, bps in self.estimates if at <= t][-1]

    def throughput(self, start: float, end: float) -> float:
        return sum(b for at, b in self.delivered if start <= at < end) * 8 / (end - start)


def _simulate(rate_at, *, duration_s: float, start_bps: float, ack_delay_s: float = 0.002,
              ack_every_s: float = 0.0, message_bytes: int = MESSAGE_BYTES) -> Run:
    """A backlogged sender paced by the meter (as ``HopSender`` paces: at the meter's rate,
    and not while its window is full) over a link whose rate at time t is ``rate_at(t)``.
    The meter starts from a probe that read ``start_bps``. ``ack_every_s``: the receiver
    sends its acks in bunches this far apart; ``ack_delay_s``: after a message arrives (a
    receiver busy computing acks late)."""
    meter = LinkMeter()
    rtt = 2 * LATENCY_S
    meter.probed(rtt, rtt + message_bytes * 8 / start_bps, message_bytes, 0.0)
    run = Run(meter, [(0.0, meter.bandwidth_bps)], [], [])
    acks: list[tuple[float, int, float, object, bool]] = []  # heap of pending acks
    t = free_at = link_free = 0.0
    seq = 0
    while t < duration_s:
        if acks and (acks[0][0] <= free_at or meter.window_full()):
            t, _, sent_at, state, was_idle = heapq.heappop(acks)
            meter.delivered(state, message_bytes, sent_at, t)
            if was_idle:
                meter.acknowledged(message_bytes, t - sent_at, t)
            run.estimates.append((t, meter.bandwidth_bps))
            continue
        t = max(t, free_at)
        was_idle = not meter.in_flight_bytes
        free_at = meter.paced_until(free_at, t, message_bytes)
        state = meter.sent(t, message_bytes, app_limited=False)
        start = max(t, link_free)
        run.queue_delays.append((t, start - t))
        link_free = start + message_bytes * 8 / rate_at(start)
        arrived = link_free + LATENCY_S
        run.delivered.append((arrived, message_bytes))
        acked = arrived + ack_delay_s
        if ack_every_s:
            acked = (acked // ack_every_s + 1) * ack_every_s
        seq += 1
        heapq.heappush(acks, (acked + LATENCY_S, seq, t, state, was_idle))
    return run


def test_a_sender_paced_below_the_link_learns_its_real_rate():
    """The probe read 90 of 100 Mbit/s: within a second (three cycles) the estimate and the
    rate delivered reach the link's, and no further."""
    rate = 100e6
    run = _simulate(lambda t: rate, duration_s=6.0, start_bps=0.9 * rate)
    assert run.estimate_at(0.0) == pytest.approx(0.9 * rate, rel=0.01)
    assert run.estimate_at(1.0) >= 0.97 * rate
    assert max(bps for _, bps in run.estimates) <= 1.02 * rate
    assert run.throughput(1.0, 6.0) >= 0.97 * rate


def test_without_the_cycle_of_gains_it_never_learns(monkeypatch):
    """The same run paced at a constant 1x: the acks only ever show the sender's own pace,
    so it stays at what the probe read (the cycle of gains is what makes the difference)."""
    monkeypatch.setattr(link_meter, "PACING_GAINS", (1.0,))
    rate = 100e6
    run = _simulate(lambda t: rate, duration_s=6.0, start_bps=0.9 * rate)
    assert run.estimate_at(6.0) <= 0.91 * rate
    assert run.throughput(3.0, 6.0) <= 0.91 * rate


def test_the_queue_it_leaves_in_socket_buffers_stays_small():
    """Probing above the estimate leaves bytes queued ahead of the link, where the link
    scheduler can no longer put a decode before them: at most what the probing phase's
    extra quarter adds, plus a message or two."""
    rate = 100e6
    run = _simulate(lambda t: rate, duration_s=6.0, start_bps=rate)
    phase_s = max(0.02, 2 * run.meter.link.latency_s)
    bound = (PACING_GAINS[0] - 1) * phase_s + 2 * MESSAGE_BYTES * 8 / rate
    assert max(delay for at, delay in run.queue_delays if at > 1.0) <= bound
    assert run.throughput(2.0, 6.0) >= 0.97 * rate


def test_a_link_that_slows_down_is_followed():
    """Another flow takes half the link after 2 s: within a second the estimate is down
    to it, and the queue does not grow without bound."""
    run = _simulate(lambda t: 100e6 if t < 2.0 else 50e6, duration_s=5.0, start_bps=100e6)
    assert run.estimate_at(1.9) >= 0.97 * 100e6
    assert run.estimate_at(3.0) <= 1.05 * 50e6
    assert max(delay for at, delay in run.queue_delays if at > 3.5) < 0.05


def test_bunched_acks_do_not_make_the_link_look_faster():
    """The receiver acks in bunches every 10 ms: a sample is never faster than the bytes
    were sent, nor shorter than a round trip, so bunching a quarter of a round trip
    overstates the link by a few per cent at most, and the cap on unacknowledged bytes
    keeps the queue that leaves within a round trip and a message."""
    rate = 100e6
    run = _simulate(lambda t: rate, duration_s=5.0, start_bps=0.9 * rate, ack_every_s=0.01)
    assert max(bps for _, bps in run.estimates) <= 1.06 * rate
    assert run.estimate_at(3.0) >= 0.95 * rate
    assert run.throughput(2.0, 5.0) >= 0.97 * rate
    rtt = 2 * LATENCY_S
    bound = (IN_FLIGHT_BDPS - 1) * rtt + 2 * MESSAGE_BYTES * 8 / rate + 0.01
    assert max(delay for at, delay in run.queue_delays if at > 1.0) < bound


@pytest.mark.parametrize("message_bytes", [256 * 1024, 640 * 1024, 1536 * 1024])
def test_the_cap_on_unacknowledged_bytes_never_throttles_large_messages(message_bytes):
    """Decode steps of 64 requests of a hidden size of 5,120 in 16 bits are 640 KiB, more than
    a 100 Mbit/s x 40 ms link holds, and a receiver computing a step acks them late (20 ms
    here): the link is still kept busy."""
    rate = 100e6
    run = _simulate(lambda t: rate, duration_s=8.0, start_bps=rate, ack_delay_s=0.02,
                    message_bytes=message_bytes)
    assert run.throughput(2.0, 8.0) >= 0.97 * rate


def test_app_limited_samples_only_raise_the_estimate():
    """A message alone on an idle link is acknowledged after a whole round trip: its
    delivery rate is far below the link's and must not lower the estimate."""
    meter = LinkMeter()
    meter.probed(0.04, 0.04 + MESSAGE_BYTES * 8 / 100e6, MESSAGE_BYTES, 0.0)
    before = meter.bandwidth_bps
    t = 10.0
    for _ in range(20):
        state = meter.sent(t, MESSAGE_BYTES, app_limited=True)
        meter.delivered(state, MESSAGE_BYTES, t, t + 0.045)
        t += 0.5
    assert meter.bandwidth_bps == before
