"""HopSender over an emulated slow link: it measures the link (probe, then from traffic)
and, paced to it, sends decode activations ahead of a prefill already being sent."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from molink.messages import BatchEntry, CachedRequest, NewRequest, RawTensor, StepPlan
from molink.sampling_params import SamplingParams
from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.codec import PART_DECODE, PART_PREFILL, decode_step
from molink.transport.hop_sender import HopSender
from molink.transport.link_emulator import LinkEmulator, LinkSpec
from molink.transport.outgoing import OutgoingStep
from molink.transport.peers import PeerSecurity, bind, make_server

SECURITY = PeerSecurity("hop-test-token", None)  # plain TCP: the relay emulates the link
HIDDEN = 512  # float32 values per token: 2 KiB


class _Sink(pb_grpc.StageServicer):
    """Acknowledges every message, recording (arrival time, decoded step) of non-probes."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, object]] = []

    async def Forward(self, request_iterator, context):
        async for message in request_iterator:
            if not message.probe:
                self.arrivals.append((time.monotonic(), decode_step(message)))
            yield pb.Ack()


@contextlib.asynccontextmanager
async def _sender_on_link(spec: str, probe: bool = True, **options):
    """(sink, started sender, relay) over a relay emulating ``spec``; all stopped afterwards."""
    sink = _Sink()
    server = make_server(SECURITY)
    pb_grpc.add_StageServicer_to_server(sink, server)
    port = bind(server, "127.0.0.1", 0, SECURITY)
    await server.start()
    relay = LinkEmulator(LinkSpec.parse(spec), "127.0.0.1", port)
    await relay.start()
    sender = HopSender(f"127.0.0.1:{relay.port}", SECURITY, to_head=False, **options)
    try:
        sender.start(probe=probe)
        if probe:
            await _wait(lambda: sender.link.bandwidth_bps > 0, 10)
        yield sink, sender, relay
    finally:
        await sender.close()
        await relay.stop()
        await server.stop(0)


def _step(step_id: int, request_id: str, tokens: int, *, new: bool) -> OutgoingStep:
    params = SamplingParams(max_tokens=None)
    plan = StepPlan(step_id, [BatchEntry(request_id, 0 if new else 40, tokens, True)],
                    new_requests=[NewRequest(request_id, [1] * tokens, tokens, params, [0])]
                    if new else [],
                    cached_requests=[] if new else [CachedRequest(request_id, [5], [])])
    rows = RawTensor(data=bytes(4 * HIDDEN * tokens), dtype="float32", shape=(tokens, HIDDEN))
    return OutgoingStep(plan, rows, tokens)


async def _wait(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_probe_measures_the_link():
    async def scenario():
        async with _sender_on_link("20mbit:15ms") as (_, sender, _):
            return sender.report()

    link = asyncio.run(scenario())
    assert link.bandwidth_bps == pytest.approx(20e6, rel=0.15)
    assert link.latency_s == pytest.approx(0.015, rel=0.25)


def test_traffic_keeps_the_measurement_current():
    """No probe: the sender starts knowing nothing of the link and learns it from the
    acknowledgements of real steps alone, latency from decode steps (2 KiB), bandwidth
    from prefills (128 KiB), and its estimate tracks the rate the link carried them at.

    Both are learnt, as in service: an acknowledgement's round trip holds, besides the
    link, the time gRPC and the event loops of sender, relay and receiver take, several
    milliseconds per message on a loaded machine. Learnt with the latency, that time is
    not counted as time on the wire (with the latency pinned to the link's 5 ms, it was:
    a busy machine read 20 Mbit/s as 13 to 17). And the reference is the rate the relay
    achieved: an asyncio task too, it can run late and carry the bytes slower than 20."""
    async def scenario():
        async with _sender_on_link("20mbit:5ms", probe=False) as (sink, sender, relay):
            for i in range(6):  # first the latency
                sender.submit(_step(100 + i, f"d{i}", 1, new=False))
                await asyncio.sleep(0.03)
            for i in range(24):  # a prefill, ~52 ms on the link, after a decode step
                sender.submit(_step(200 + i, f"d{6 + i}", 1, new=False))
                await asyncio.sleep(0.02)
                sender.submit(_step(i, f"r{i}", 64, new=True))
                await asyncio.sleep(0.07)
            await _wait(lambda: sum(s.plan.num_tokens for _, s in sink.arrivals) == 30 + 24 * 64,
                        20)
            return sender.report(), relay.achieved_bps()

    link, achieved_bps = asyncio.run(scenario())
    assert link.bandwidth_bps == pytest.approx(achieved_bps, rel=0.2)
    assert link.messages_sent >= 54 and link.tokens_sent == 30 + 24 * 64


@pytest.mark.parametrize("schedule", ["molink", "fifo"])
def test_decode_overtakes_a_prefill_being_sent(schedule):
    """A 1,024-token prefill (2 MiB, ~0.85 s at 20 Mbit/s) is on its way when a decode
    step arrives: with the MoLink schedule the decode arrives within a chunk's time,
    with first-in first-out it waits for the whole prefill."""
    async def scenario():
        async with _sender_on_link("20mbit:5ms", schedule=schedule) as (sink, sender, _):
            sender.submit(_step(1, "long", 1024, new=True))
            await asyncio.sleep(0.1)
            submitted = time.monotonic()
            sender.submit(_step(2, "short", 1, new=False))
            await _wait(lambda: sum(s.plan.num_tokens for _, s in sink.arrivals) == 1025, 20)
            return submitted, sink.arrivals

    submitted, arrivals = asyncio.run(scenario())
    decode_at = next(t for t, s in arrivals if s.plan.batch[0].request_id == "short")
    prefill = [(t, s) for t, s in arrivals if s.plan.batch[0].request_id == "long"]
    prefill_done = max(t for t, _ in prefill)
    pieces = [s.plan.batch[0] for _, s in prefill]
    assert sum(p.num_tokens for p in pieces) == 1024
    assert [p.start for p in pieces] == sorted(p.start for p in pieces)  # in order
    if schedule == "molink":
        assert len(pieces) > 1 and all(s.part == PART_PREFILL for _, s in prefill)
        assert next(s for _, s in arrivals if s.plan.batch[0].request_id == "short").part \
            == PART_DECODE
        assert decode_at - submitted < 0.25  # one chunk + latency, not the whole prefill
        assert decode_at < prefill_done - 0.3
    else:
        assert len(pieces) == 1 and decode_at > prefill_done


def _mixed_step(step_id: int, prompt_tokens: int) -> OutgoingStep:
    """A running request's decode ("d") and a new request's prompt ("p"), rows in that order."""
    params = SamplingParams(max_tokens=None)
    tokens = 1 + prompt_tokens
    plan = StepPlan(step_id, [BatchEntry("d", 40, 1, True), BatchEntry("p", 0, prompt_tokens, True)],
                    new_requests=[NewRequest("p", [1] * prompt_tokens, prompt_tokens, params, [0])],
                    cached_requests=[CachedRequest("d", [5], [])])
    rows = RawTensor(data=bytes(4 * HIDDEN * tokens), dtype="float32", shape=(tokens, HIDDEN))
    return OutgoingStep(plan, rows, tokens)


@pytest.mark.parametrize(("link", "prompt_tokens"), [("1gbit:1ms", 64), ("20mbit:5ms", 512)])
def test_a_step_mixing_decodes_and_a_prompt_travels_as_one_part(link, prompt_tokens):
    """The decode of a step that carries a prompt is not sent ahead of it (the step's result
    waits for every token anyway, and the next stage would compute the step twice): one
    prefill part, whole when it is small on the link (1 Gbit: 130 KiB), else cut in order,
    the decode in the first chunk (20 Mbit: 1 MiB, ~0.4 s)."""
    async def scenario():
        async with _sender_on_link(link) as (sink, sender, _):
            sender.submit(_mixed_step(1, prompt_tokens))
            await _wait(lambda: sum(s.plan.num_tokens for _, s in sink.arrivals)
                        == 1 + prompt_tokens, 20)
            return [s for _, s in sink.arrivals]

    pieces = asyncio.run(scenario())
    assert all(s.part == PART_PREFILL for s in pieces)
    entries = [e for s in pieces for e in s.plan.batch]
    assert entries[0] == BatchEntry("d", 40, 1, True)
    assert [(e.request_id, e.start) for e in entries[1:]] == [
        ("p", sum(e.num_tokens for e in entries[1:i])) for i in range(1, len(entries))]
    if link == "1gbit:1ms":
        assert len(pieces) == 1
    else:
        assert len(pieces) > 1
