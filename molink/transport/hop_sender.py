"""HopSender: everything a process sends on one hop, scheduled for a slow link.

One long-lived stream per hop. The receiver acknowledges every message as soon as it is
parsed; from the acknowledgements the sender measures the link (``LinkMeter``: probed when
the route is set, then kept current from real traffic) and paces itself to it, so its queue stays
here, where the link scheduler can reorder it, instead of in socket buffers, where it is
first-in first-out::

    submit(step) -> a decode or prefill part -> LinkScheduler -> pace -> stream.write
                                                                 acks -> bandwidth, latency

Delivery is reliable across broken connections: every message carries the sender's id and
a sequence number, and stays in ``_unacked`` until acknowledged. A stream that breaks (a
reset, a peer that restarted its socket, a keepalive timeout) is re-opened and everything
unacknowledged is sent again, in order; the receiver drops what it already took
(``DuplicateFilter``). Only when the hop cannot be re-opened within ``REOPEN_TIMEOUT_S``
does ``broken`` resolve, and the owner fails what travelled on it, naming the hop.

Schedules: ``molink`` (decode parts first, prefill cut into just-in-time chunks, aging so
prefill progresses), ``priority`` (decode parts first, prefill whole), ``fifo`` (whole steps
in arrival order, written as fast as the stream takes them: how pipelines usually send).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import secrets
import time

import grpc

from molink.messages import WIRE_COMPRESSIONS, LinkReport
from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.chunks import Part, cut_chunk, step_part
from molink.transport.codec import PART_DECODE, PART_PREFILL, PART_WHOLE, encode_link, encode_step
from molink.transport.link_meter import INITIAL_BANDWIDTH_BPS, LinkMeter, SendState
from molink.transport.link_scheduler import LinkScheduler, Payload
from molink.transport.outgoing import OutgoingStep
from molink.transport.peers import Peer, PeerSecurity, error_detail

logger = logging.getLogger(__name__)

SCHEDULES = ("molink", "priority", "fifo")
COMPRESSIONS = ("auto", *WIRE_COMPRESSIONS)  # what a route may ask for
PROBE_BYTES = 256 * 1024
_MIN_CHUNK_TOKENS = 32
# A prefill chunk carries at least this much link time: a decode waits at most that (or 32
# tokens' time) behind one, and the next stage computes fewer, larger pieces on fast links.
_MIN_CHUNK_S = 0.002
REOPEN_TIMEOUT_S = 10.0  # a broken hop that cannot be re-opened this long is lost
CONNECT_TIMEOUT_S = 10.0  # the first connection (and its link probe)


@dataclasses.dataclass
class _Unacked:
    sent_at: float
    num_bytes: int
    link_was_idle: bool
    probe: asyncio.Future | None = None
    message: object = None  # kept to be sent again if the stream breaks first (not probes)
    state: SendState | None = None  # the meter's, for the delivery rate (not probes)


class _Item:
    """One submitted step as one part; the compute times go with its first send."""

    def __init__(self, step: OutgoingStep, part: Part) -> None:
        self.step = step
        self.part = part
        self.timings_sent = False


class HopSender:
    def __init__(self, address: str, security: PeerSecurity, *, to_head: bool,
                 schedule: str = "molink", compression: str = "none",
                 max_chunk_tokens: int | None = None, label: str = "",
                 expected_fingerprint: str = "") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"link schedule must be one of {', '.join(SCHEDULES)}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}")
        self.address = address
        self.to_head = to_head
        self.schedule = schedule
        self.compression = compression
        self.label = label or address
        self.meter = LinkMeter()
        self.link = self.meter.link  # what this hop reports (measurements, counters)
        self._security = security
        self._expected_fingerprint = expected_fingerprint  # the receiver's certificate
        self._peer: Peer | None = None  # opened by the first connection
        self._call = None
        # Sent in order, before anything the link scheduler holds: results (a StepResult)
        # and, with the ``fifo`` schedule, every step (an _Item).
        self._fifo: collections.deque = collections.deque()
        # ``priority``: decode first, but a prefill goes whole (chunks of "every token").
        self._scheduler = LinkScheduler(
            INITIAL_BANDWIDTH_BPS,
            min_chunk_tokens=_MIN_CHUNK_TOKENS if schedule == "molink" else 1 << 30,
            max_chunk_tokens=max_chunk_tokens if schedule == "molink" else None,
            min_chunk_s=_MIN_CHUNK_S if schedule == "molink" else 0.0)
        self._payloads: dict[int, _Item] = {}
        self._next_payload = 0
        self._wakeup = asyncio.Event()
        self._unacked: collections.deque[_Unacked] = collections.deque()
        self._free_at = 0.0  # when the link finishes what was written (paced schedules)
        self._window_full = False  # sending waits for an acknowledgement
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._stream_alive = False
        self.sender_id = secrets.token_hex(8)
        self._seq = itertools.count(1)
        self.num_reconnects = 0
        loop = asyncio.get_running_loop()
        # Resolves when the stream is open and the link measured (or with the error).
        self.connected: asyncio.Future = loop.create_future()
        # Resolves (with a description) when the hop is lost for good.
        self.broken: asyncio.Future = loop.create_future()

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, probe: bool = True) -> None:
        """Open the stream and measure the link, in the background, before any traffic;
        ``connected`` tells when that is done."""
        self._tasks.append(asyncio.create_task(self._run(probe)))

    async def wait_connected(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Until the stream is open and the link measured; ConnectionError naming the hop
        and the address tried otherwise."""
        try:
            await asyncio.wait_for(asyncio.shield(self.connected), timeout_s)
        except TimeoutError:
            raise ConnectionError(f"{self.label}: no connection to {self.address} within "
                                  f"{timeout_s:.0f} s") from None

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._call is not None:
            self._call.cancel()
        if self._peer is not None:
            await self._peer.close()

    async def _run(self, probe: bool) -> None:
        """Keep one stream open: re-open it when it breaks (sending again what was not
        acknowledged) until it stays broken for ``REOPEN_TIMEOUT_S``."""
        broken_since = 0.0
        backoff = 0.1
        while True:
            try:
                await self._open()
                await self._serve_stream(probe and not self.connected.done())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any break: re-open, or report it lost
                if self._closed:
                    return
                now = time.monotonic()
                if self._stream_alive or not broken_since:  # a new break, not a failed retry
                    broken_since, backoff = now, 0.1
                if not self.connected.done() or now - broken_since > REOPEN_TIMEOUT_S:
                    self._set_broken(exc)
                    return
                logger.warning("link %s broke (%s); re-opening it", self.label, error_detail(exc))
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)

    async def _open(self) -> None:
        """A new stream on the channel; what the last one did not get acknowledged is
        written again first, in order."""
        if self._call is not None:
            self._call.cancel()
        if self._peer is None:
            self._peer = await Peer.open(self.address, self._security,
                                         self._expected_fingerprint)
        stub = (pb_grpc.HeadStub if self.to_head else pb_grpc.StageStub)(self._peer.channel)
        self._call = (stub.Results if self.to_head else stub.Forward)(
            metadata=self._peer.metadata)
        self._stream_alive = False  # until its first acknowledgement
        pending = [u for u in self._unacked if u.message is not None]
        for sent in self._unacked:
            if sent.probe is not None and not sent.probe.done():
                sent.probe.set_exception(ConnectionError(f"link {self.label} broke"))
        self._unacked.clear()
        # An empty probe first: its acknowledgement shows the stream works, even when
        # nothing else is waiting to be sent.
        alive = asyncio.get_running_loop().create_future()
        alive.add_done_callback(lambda f: f.cancelled() or f.exception())
        probe = self._probe_message(0)
        now = time.monotonic()
        self._unacked.append(_Unacked(now, probe.ByteSize(), False, alive))
        # All back in the queue before the first write: if this stream breaks too, the next
        # one sends them again.
        self._unacked.extend(_Unacked(now, sent.num_bytes, False, message=sent.message)
                             for sent in pending)
        if pending:
            self.num_reconnects += 1
            logger.info("link %s re-opened; sending %d unacknowledged messages again",
                        self.label, len(pending))
        await self._call.write(probe)
        for sent in pending:
            await self._call.write(sent.message)

    async def _serve_stream(self, probe: bool) -> None:
        """Read acknowledgements, measure the link (first time), send; until either fails
        (then raise)."""
        async def send() -> None:
            if probe:
                await self._probe()
            if not self.connected.done():
                self.connected.set_result(None)
            await self._send_loop()

        tasks = [asyncio.create_task(self._read_acks()), asyncio.create_task(send())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the failure
            raise ConnectionError("the stream ended")
        finally:
            for task in tasks:
                task.cancel()

    # ---- what goes out -----------------------------------------------------------------------

    def wire_compression(self, native_dtype: str) -> str:
        """The compression to apply to the next step (see ``LinkMeter.wire_compression``)."""
        return self.meter.wire_compression(self.compression, native_dtype)

    def submit(self, step: OutgoingStep) -> None:
        """Queue a step (event-loop thread only)."""
        known = None if step.part == PART_WHOLE else step.part == PART_PREFILL
        part = step_part(step.plan, step.activations, known)
        if step.reset or step.error:  # control traffic keeps its order among decodes
            part.is_prefill = False
        item = _Item(step, part)
        if self.schedule == "fifo":
            self._fifo.append(item)
        else:
            payload_id = self._next_payload
            self._next_payload += 1
            self._payloads[payload_id] = item
            if not part.is_prefill:
                self.meter.note_decode(time.monotonic())
            self._scheduler.enqueue(Payload(payload_id, part.is_prefill,
                                            max(1, part.num_tokens), part.bytes_per_token))
        self._wakeup.set()

    def submit_result(self, message: pb.StepResult, computed_at: float = 0.0) -> None:
        """Queue the last stage's result; ``computed_at``: when its compute ended."""
        self._fifo.append((message, computed_at))
        self._wakeup.set()

    def report(self) -> LinkReport:
        return dataclasses.replace(self.link)

    def _report_for(self, computed_at: float) -> LinkReport:
        """The link's report, with how long the step waited here since its compute ended."""
        waited = time.monotonic() - computed_at if computed_at else 0.0
        return dataclasses.replace(self.link, send_wait_s=max(0.0, waited))

    # ---- sending -----------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            message, tokens = self._next_message()
            if message is None:
                continue
            await self._write(message, tokens)

    def _next_message(self):
        """The next message to write, or (None, 0) after waiting as pacing asks."""
        if self._fifo:
            entry = self._fifo.popleft()
            if isinstance(entry, _Item):
                return self._message(entry, 0, entry.part.num_tokens, entry.step.part)
            message, computed_at = entry  # a result: it carries every hop's report
            self.link.messages_sent += 1
            message.hops.append(encode_link(self._report_for(computed_at)))
            return message, 0
        if self._scheduler.idle:
            self._wakeup.clear()
            return None, 0
        wait = self._free_at - time.monotonic()
        self._window_full = self.meter.window_full()  # then an acknowledgement wakes it up
        if self._window_full or wait > 0.0005:
            self._wakeup.clear()
            if not self._window_full:
                asyncio.get_running_loop().call_later(wait, self._wakeup.set)
            return None, 0
        send = self._scheduler.next_send(self.meter.seconds_until_next_decode(time.monotonic()))
        item = self._payloads[send.payload_id]
        if send.last:
            del self._payloads[send.payload_id]
        kind = PART_PREFILL if item.part.is_prefill else PART_DECODE
        return self._message(item, send.start_token, send.start_token + send.num_tokens, kind)

    def _message(self, item: _Item, start: int, end: int, kind: int):
        step = item.step
        plan, activations = cut_chunk(item.part, start, end)
        timings, waits = step.stage_compute_s, step.stage_wait_s
        if item.timings_sent:  # the later chunks of a step add no compute time of their own
            timings, waits = (0.0,) * len(timings), (0.0,) * len(waits)
        item.timings_sent = True
        tokens = plan.num_tokens if activations is not None else 0
        self.link.messages_sent += 1  # counted before the report, which includes this message
        self.link.tokens_sent += tokens
        message = encode_step(plan, activations, reset=step.reset, error=step.error,
                              stage_compute_s=timings, step_num_tokens=step.step_num_tokens,
                              hops=(*step.hops, self._report_for(step.computed_at)), part=kind,
                              epoch=step.epoch, stage_wait_s=waits)
        return message, tokens

    async def _write(self, message, tokens: int) -> None:
        message.sender_id, message.seq = self.sender_id, next(self._seq)
        num_bytes = message.ByteSize()
        now = time.monotonic()
        idle = self._free_at <= now
        self._free_at = self.meter.paced_until(self._free_at, now, num_bytes)
        state = self.meter.sent(now, num_bytes, app_limited=not self._fifo
                                and self._scheduler.idle)
        self._unacked.append(_Unacked(now, num_bytes, idle, message=message, state=state))
        self.link.bytes_sent += num_bytes
        await self._call.write(message)

    # ---- measuring ---------------------------------------------------------------------------

    async def _probe(self) -> None:
        """Two small and two large messages, one at a time: latency from the small ones'
        round trips, bandwidth from how much longer the large ones take."""
        rtts = {}
        for size in (0, 0, PROBE_BYTES, PROBE_BYTES):
            future = asyncio.get_running_loop().create_future()
            message = self._probe_message(size)
            start = time.monotonic()
            self._unacked.append(_Unacked(start, message.ByteSize(), False, future))
            await self._call.write(message)
            await future
            rtts.setdefault(size, []).append(time.monotonic() - start)
        self.meter.probed(min(rtts[0]), min(rtts[PROBE_BYTES]), PROBE_BYTES,
                          time.monotonic())
        self._scheduler.bandwidth_bps = self.link.bandwidth_bps
        logger.info("link %s: %.1f Mbit/s, %.1f ms one way (probed)", self.label,
                    self.link.bandwidth_bps / 1e6, self.link.latency_s * 1e3)

    def _probe_message(self, size: int):
        return (pb.StepResult if self.to_head else pb.StepMessage)(probe=True,
                                                                   padding=b"\0" * size)

    async def _read_acks(self) -> None:
        call = self._call
        while True:
            ack = await call.read()
            if ack is grpc.aio.EOF:
                raise ConnectionError("the receiver closed the stream")
            self._stream_alive = True
            if self._unacked:
                self._on_ack(self._unacked.popleft(), time.monotonic())

    def _on_ack(self, sent: _Unacked, now: float) -> None:
        if sent.probe is not None:
            if not sent.probe.done():
                sent.probe.set_result(None)
            return
        changed = self.meter.delivered(sent.state, sent.num_bytes, sent.sent_at, now)
        if self._window_full and not self.meter.window_full():
            self._window_full = False
            self._wakeup.set()
        # the idle-link measurement: not for one that waited behind earlier bytes
        if sent.link_was_idle and self.meter.acknowledged(sent.num_bytes, now - sent.sent_at,
                                                          now) or changed:
            self._scheduler.bandwidth_bps = self.link.bandwidth_bps

    def _set_broken(self, exc: Exception) -> None:
        detail = error_detail(exc)
        if not self.broken.done():
            self.broken.set_result(detail)
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(
                f"{self.label}: cannot connect to {self.address}: {detail}"))
            self.connected.exception()  # retrieved: nobody may be waiting for it
        for sent in self._unacked:
            if sent.probe is not None and not sent.probe.done():
                sent.probe.set_exception(ConnectionError(f"link {self.label} broke"))

