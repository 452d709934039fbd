"""Property tests of the link scheduler on a simulated link (pure Python, no torch)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molink.transport.link_scheduler import LinkScheduler, Payload

BYTES_PER_TOKEN = 8192 * 2  # hidden 8192, bf16


def _simulate(arrivals, bandwidth_bps: float, max_bypass: int, min_chunk: int,
              min_chunk_s: float = 0.0):
    """Run the link until everything is sent; arrivals: [(time, is_prefill, tokens)]."""
    scheduler = LinkScheduler(bandwidth_bps, min_chunk_tokens=min_chunk, max_bypass=max_bypass,
                              min_chunk_s=min_chunk_s)
    pending = sorted(arrivals, key=lambda a: a[0])
    decode_times = [t for t, is_prefill, _ in pending if not is_prefill]
    now, next_id, sends, arrived_at = 0.0, 0, [], {}
    while pending or not scheduler.idle:
        while pending and pending[0][0] <= now:
            t, is_prefill, tokens = pending.pop(0)
            scheduler.enqueue(Payload(next_id, is_prefill, tokens, BYTES_PER_TOKEN))
            arrived_at[next_id] = t
            next_id += 1
        future = [t - now for t in decode_times if t > now]
        send = scheduler.next_send(min(future) if future else None)
        if send is None:
            now = pending[0][0]
            continue
        sends.append((now, send))
        now += send.num_bytes * 8 / bandwidth_bps
    return sends, arrived_at


arrival = st.tuples(st.floats(0, 2.0), st.booleans(), st.integers(1, 2000))


@settings(max_examples=200, deadline=None)
@given(st.lists(arrival, min_size=1, max_size=40), st.sampled_from([20e6, 100e6, 1e9]),
       st.integers(0, 6), st.integers(1, 64), st.sampled_from([0.0, 0.002, 0.02]))
def test_decodes_wait_behind_at_most_one_chunk_and_prefill_always_finishes(
        arrivals, bandwidth, max_bypass, min_chunk, min_chunk_s):
    arrivals = [(t, p, n if p else 1) for t, p, n in arrivals]  # decode: one token each
    sends, arrived_at = _simulate(arrivals, bandwidth, max_bypass, min_chunk, min_chunk_s)
    # Every payload is sent completely, prefills as contiguous in-order chunks.
    progress: dict[int, int] = {}
    for _, send in sends:
        assert send.start_token == progress.get(send.payload_id, 0)
        progress[send.payload_id] = send.start_token + send.num_tokens
    tokens = {i: (n if p else 1) for i, (_, p, n) in enumerate(sorted(arrivals, key=lambda a: a[0]))}
    assert progress == tokens
    # A decode payload never waits behind more than one prefill chunk: at most one chunk's
    # transmission overlaps the time between its arrival and the start of its own send.
    for sent_at, send in sends:
        if send.is_prefill:
            continue
        arrived = arrived_at[send.payload_id]
        blocking = [s for t, s in sends if s.is_prefill and t < sent_at
                    and t + s.num_bytes * 8 / bandwidth > arrived + 1e-12]
        assert len(blocking) <= 1


def test_prefill_progresses_under_a_continuous_decode_stream():
    """Decodes arrive as fast as the link sends them: the prefill is passed over by at most
    max_bypass of them in a row, and never sends two chunks in a row while a decode waits."""
    scheduler = LinkScheduler(100e6, min_chunk_tokens=32, max_bypass=3)
    scheduler.enqueue(Payload(0, True, 1000, BYTES_PER_TOKEN))
    kinds, next_id = [], 1
    while not scheduler.idle or next_id == 1:
        if not scheduler._decodes:  # a decode always waits, one at a time
            scheduler.enqueue(Payload(next_id, False, 1, BYTES_PER_TOKEN))
            next_id += 1
        send = scheduler.next_send(0.001)
        kinds.append("P" if send.is_prefill else "D")
        if send.is_prefill and send.last:
            break
    runs = "".join(kinds)
    assert "PP" not in runs
    assert "DDDD" not in runs
    assert runs.count("P") == -(-1000 // 32)  # the prefill completed, in minimum chunks


def test_chunks_are_sized_to_the_gap_before_the_next_decode():
    scheduler = LinkScheduler(100e6, min_chunk_tokens=8)
    scheduler.enqueue(Payload(0, True, 5000, BYTES_PER_TOKEN))
    send = scheduler.next_send(0.02)  # 20 ms at 100 Mbit/s = 250,000 bytes
    assert send.num_tokens == 250_000 // BYTES_PER_TOKEN
    assert scheduler.next_send(0.0).num_tokens == 8  # a decode is due now: minimum chunk
    # Nothing due: still no more than max_wait_s (50 ms) of link time, in case one comes.
    assert scheduler.next_send(None).num_tokens == 625_000 // BYTES_PER_TOKEN
    whole = LinkScheduler(100e6, min_chunk_tokens=8, max_wait_s=None)
    whole.enqueue(Payload(0, True, 5000, BYTES_PER_TOKEN))
    assert whole.next_send(None).num_tokens == 5000  # unbounded: the whole rest


def test_a_chunk_carries_at_least_min_chunk_s_of_link_time():
    """A decode due now: at 10 Gbit/s a 2 ms floor lets 2.5 MB go (152 tokens of 16 KiB
    instead of the 8-token minimum); at 20 Mbit/s 2 ms is 5,000 bytes, less than the token
    minimum, which then holds; the hard cap still wins."""
    fast = LinkScheduler(10e9, min_chunk_tokens=8, min_chunk_s=0.002)
    fast.enqueue(Payload(0, True, 5000, BYTES_PER_TOKEN))
    assert fast.next_send(0.0).num_tokens == 2_500_000 // BYTES_PER_TOKEN
    slow = LinkScheduler(20e6, min_chunk_tokens=8, min_chunk_s=0.002)
    slow.enqueue(Payload(0, True, 5000, BYTES_PER_TOKEN))
    assert slow.next_send(0.0).num_tokens == 8
    capped = LinkScheduler(10e9, min_chunk_tokens=8, min_chunk_s=0.002, max_chunk_tokens=50)
    capped.enqueue(Payload(0, True, 5000, BYTES_PER_TOKEN))
    assert capped.next_send(0.0).num_tokens == 50
    with pytest.raises(ValueError):
        LinkScheduler(10e9, min_chunk_s=-1.0)
