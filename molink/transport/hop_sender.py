"""HopSender: everything a process sends on one hop, scheduled for a slow link.

One long-lived stream per hop. The receiver acknowledges every message as soon as it is
parsed; from the acknowledgements the sender measures the link (probed when the route is
set, then kept current from real traffic, EWMA) and paces itself to it, so its queue stays
here, where the link scheduler can reorder it, instead of in socket buffers, where it is
first-in first-out::

    submit(step) -> split into decode / prefill parts -> LinkScheduler -> pace -> stream.write
                                                                 acks -> bandwidth, latency

Schedules: ``molink`` (decode parts first, prefill cut into just-in-time chunks, aging so
prefill progresses), ``priority`` (decode parts first, prefill whole), ``fifo`` (whole steps
in arrival order, written as fast as the stream takes them: how pipelines usually send).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

import grpc

from molink.messages import LinkReport, RawTensor, StepPlan
from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.codec import (DTYPE_SIZES, PART_DECODE, PART_PREFILL, PART_WHOLE,
                                    encode_link, encode_step)
from molink.transport.fragments import Part, fragment, split_parts
from molink.transport.link_scheduler import LinkScheduler, Payload
from molink.transport.peers import Peer

logger = logging.getLogger(__name__)

SCHEDULES = ("molink", "priority", "fifo")
COMPRESSIONS = ("auto", "none", "float16", "bfloat16", "int8")
PROBE_BYTES = 256 * 1024
_INITIAL_BANDWIDTH_BPS = 1e9
_MAX_BANDWIDTH_BPS = 1e11  # beyond this, measurements on one machine are noise
_EWMA = 0.2
_SMALL_BYTES = 8 * 1024  # acks of messages this small measure latency
_LARGE_BYTES = 32 * 1024  # acks of messages this large measure bandwidth
_MIN_CHUNK_TOKENS = 32


@dataclasses.dataclass
class OutgoingStep:
    """A computed step (or fragment of one) leaving this process."""

    plan: StepPlan
    rows: RawTensor | None  # activations of plan.batch's tokens, or None
    step_num_tokens: int
    reset: bool = False
    error: str = ""
    stage_compute_s: tuple[float, ...] = ()
    hops: tuple[LinkReport, ...] = ()  # upstream hops; this hop's report is appended
    part: int = PART_WHOLE  # the part of the step this is, when it is one already


@dataclasses.dataclass
class _Unacked:
    sent_at: float
    num_bytes: int
    link_was_idle: bool
    probe: asyncio.Future | None = None


class _Item:
    """One submitted step split into parts; the compute times go with its first send."""

    def __init__(self, step: OutgoingStep, parts: list[Part]) -> None:
        self.step = step
        self.parts = parts
        self.timings_sent = False


class HopSender:
    def __init__(self, address: str, token: str, *, to_head: bool, schedule: str = "molink",
                 compression: str = "none", max_chunk_tokens: int | None = None,
                 label: str = "") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"link schedule must be one of {', '.join(SCHEDULES)}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}")
        self.address = address
        self.to_head = to_head
        self.schedule = schedule
        self.compression = compression
        self.label = label or address
        self.link = LinkReport(bandwidth_bps=0.0, latency_s=0.0, compression="none")
        self._peer = Peer(address, token)
        self._call = None
        self._fifo: collections.deque = collections.deque()  # (message, tokens) or _Item
        # ``priority``: decode first, but a prefill goes whole (chunks of "every token").
        self._scheduler = LinkScheduler(
            _INITIAL_BANDWIDTH_BPS,
            min_chunk_tokens=_MIN_CHUNK_TOKENS if schedule == "molink" else 1 << 30,
            max_chunk_tokens=max_chunk_tokens if schedule == "molink" else None)
        self._payloads: dict[int, tuple[_Item, Part]] = {}
        self._next_payload = 0
        self._wakeup = asyncio.Event()
        self._unacked: collections.deque[_Unacked] = collections.deque()
        self._free_at = 0.0  # when the link finishes what was written (paced schedules)
        self._last_decode_at: float | None = None
        self._decode_interval_s: float | None = None
        self._tasks: list[asyncio.Task] = []
        self.broken: asyncio.Future = asyncio.get_running_loop().create_future()

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, probe: bool = True) -> None:
        """Open the stream; measure the link (in the background, before any traffic)."""
        stub = (pb_grpc.HeadStub if self.to_head else pb_grpc.StageStub)(self._peer.channel)
        method = stub.Results if self.to_head else stub.Forward
        self._call = method(metadata=self._peer.metadata)
        self._tasks.append(asyncio.create_task(self._read_acks()))
        self._tasks.append(asyncio.create_task(self._send_loop(probe)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._call is not None:
            self._call.cancel()
        await self._peer.close()

    # ---- what goes out -----------------------------------------------------------------------

    def wire_compression(self, native_dtype: str, hidden_size: int,
                         compute_s_per_token: float) -> str:
        """The compression to apply now: as configured, or for ``auto`` from the measured
        link against the stage's compute: int8 when the link's time per token is more than a
        tenth of the compute's, float16 for a float32 model when it is more than 2 %
        (benchmarks/results/compression_accuracy.md: float16 changed no greedy token)."""
        choice = self.compression
        if choice == "auto":
            bandwidth = self.link.bandwidth_bps or _INITIAL_BANDWIDTH_BPS
            link_s = hidden_size * DTYPE_SIZES.get(native_dtype, 4) * 8 / bandwidth
            share = link_s / (link_s + max(compute_s_per_token, 1e-9))
            choice = "none"
            if share > 0.10:
                choice = "int8"
            elif share > 0.02 and native_dtype == "float32":
                choice = "float16"  # 8x more precise than bfloat16; out-of-range goes bf16
        self.link.compression = choice
        return choice

    def submit(self, step: OutgoingStep) -> None:
        """Queue a step (event-loop thread only)."""
        separate = self.schedule != "fifo" and not step.reset and not step.error
        known = None if step.part == PART_WHOLE else step.part == PART_PREFILL
        parts = split_parts(step.plan, step.rows, separate_prefill=separate, is_prefill=known)
        if step.reset or step.error:  # control traffic keeps its order among decodes
            parts[0].is_prefill = False
        item = _Item(step, parts)
        if self.schedule == "fifo":
            self._fifo.append(item)
        else:
            for part in parts:
                payload_id = self._next_payload
                self._next_payload += 1
                self._payloads[payload_id] = (item, part)
                bytes_per_token = 64  # plan metadata only
                if part.rows is not None:
                    bytes_per_token = part.rows.row_bytes + 4 * bool(part.rows.row_scales)
                if not part.is_prefill:
                    self._note_decode()
                self._scheduler.enqueue(Payload(payload_id, part.is_prefill,
                                                max(1, part.num_tokens), max(1, bytes_per_token)))
        self._wakeup.set()

    def submit_result(self, message: pb.StepResult) -> None:
        self._fifo.append(message)
        self._wakeup.set()

    def report(self) -> LinkReport:
        return dataclasses.replace(self.link)

    # ---- sending -----------------------------------------------------------------------------------

    async def _send_loop(self, probe: bool) -> None:
        try:
            if probe:
                await self._probe()
            while True:
                await self._wakeup.wait()
                message, tokens = self._next_message()
                if message is None:
                    continue
                await self._write(message, tokens)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: tell the owner, stop sending
            self._set_broken(exc)

    def _next_message(self):
        """The next message to write, or (None, 0) after waiting as pacing asks."""
        if self._fifo:
            entry = self._fifo.popleft()
            if isinstance(entry, _Item):
                return self._message(entry, entry.parts[0], 0, entry.parts[0].num_tokens,
                                     entry.step.part)
            self.link.messages_sent += 1
            entry.hops.append(encode_link(self.report()))  # results carry every hop's report
            return entry, 0
        if self._scheduler.idle:
            self._wakeup.clear()
            return None, 0
        wait = self._free_at - time.monotonic()
        if wait > 0.0005:
            self._wakeup.clear()
            asyncio.get_running_loop().call_later(wait, self._wakeup.set)
            return None, 0
        send = self._scheduler.next_send(self._seconds_until_next_decode())
        item, part = self._payloads[send.payload_id]
        if send.last:
            del self._payloads[send.payload_id]
        kind = PART_PREFILL if part.is_prefill else PART_DECODE
        return self._message(item, part, send.start_token, send.start_token + send.num_tokens,
                             kind)

    def _message(self, item: _Item, part: Part, start: int, end: int, kind: int):
        step = item.step
        plan, rows = fragment(part, start, end)
        timings = step.stage_compute_s if not item.timings_sent else (0.0,) * len(
            step.stage_compute_s)
        item.timings_sent = True
        tokens = plan.num_tokens if rows is not None else 0
        self.link.messages_sent += 1  # counted before the report, which includes this message
        self.link.tokens_sent += tokens
        message = encode_step(plan, rows, reset=step.reset, error=step.error,
                              stage_compute_s=timings, step_num_tokens=step.step_num_tokens,
                              hops=(*step.hops, self.report()), part=kind)
        return message, tokens

    async def _write(self, message, tokens: int) -> None:
        num_bytes = message.ByteSize()
        now = time.monotonic()
        idle = self._free_at <= now
        bandwidth = self.link.bandwidth_bps or _INITIAL_BANDWIDTH_BPS
        self._free_at = max(now, self._free_at) + num_bytes * 8 / bandwidth
        self._unacked.append(_Unacked(now, num_bytes, idle))
        self.link.bytes_sent += num_bytes
        await self._call.write(message)

    # ---- measuring -------------------------------------------------------------------------------

    async def _probe(self) -> None:
        """Two small and two large messages, one at a time: latency from the small ones'
        round trips, bandwidth from how much longer the large ones take."""
        rtts = {}
        for size in (0, 0, PROBE_BYTES, PROBE_BYTES):
            future = asyncio.get_running_loop().create_future()
            message = (pb.StepResult if self.to_head else pb.StepMessage)(
                probe=True, padding=b"\0" * size)
            start = time.monotonic()
            self._unacked.append(_Unacked(start, message.ByteSize(), False, future))
            await self._call.write(message)
            await future
            rtts.setdefault(size, []).append(time.monotonic() - start)
        small, large = min(rtts[0]), min(rtts[PROBE_BYTES])
        self.link.latency_s = small / 2
        self.link.bandwidth_bps = min(_MAX_BANDWIDTH_BPS,
                                      PROBE_BYTES * 8 / max(large - small, 1e-9))
        self._scheduler.bandwidth_bps = self.link.bandwidth_bps
        logger.info("link %s: %.1f Mbit/s, %.1f ms one way (probed)", self.label,
                    self.link.bandwidth_bps / 1e6, self.link.latency_s * 1e3)

    async def _read_acks(self) -> None:
        try:
            while True:
                ack = await self._call.read()
                if ack is grpc.aio.EOF:
                    raise ConnectionError("the receiver closed the stream")
                if self._unacked:
                    self._on_ack(self._unacked.popleft(), time.monotonic())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._set_broken(exc)

    def _on_ack(self, sent: _Unacked, now: float) -> None:
        if sent.probe is not None:
            if not sent.probe.done():
                sent.probe.set_result(None)
            return
        if not sent.link_was_idle:
            return  # it waited behind earlier bytes: its time says nothing clean
        elapsed = now - sent.sent_at
        bandwidth = self.link.bandwidth_bps or _INITIAL_BANDWIDTH_BPS
        if sent.num_bytes <= _SMALL_BYTES:
            rtt = max(0.0, elapsed - sent.num_bytes * 8 / bandwidth)
            self.link.latency_s += _EWMA * (rtt / 2 - self.link.latency_s)
        elif sent.num_bytes >= _LARGE_BYTES:
            transfer = elapsed - 2 * self.link.latency_s
            if transfer > 0.1 * elapsed:
                sample = min(_MAX_BANDWIDTH_BPS, sent.num_bytes * 8 / transfer)
                self.link.bandwidth_bps += _EWMA * (sample - self.link.bandwidth_bps)
                self._scheduler.bandwidth_bps = self.link.bandwidth_bps

    def _note_decode(self) -> None:
        now = time.monotonic()
        if self._last_decode_at is not None:
            gap = now - self._last_decode_at
            self._decode_interval_s = gap if self._decode_interval_s is None else (
                self._decode_interval_s + _EWMA * (gap - self._decode_interval_s))
        self._last_decode_at = now

    def _seconds_until_next_decode(self) -> float | None:
        """When the next decode part is expected here (None: no decode traffic lately)."""
        if self._decode_interval_s is None or self._last_decode_at is None:
            return None
        since = time.monotonic() - self._last_decode_at
        if since > 3 * self._decode_interval_s + 0.1:
            return None
        return max(0.0, self._decode_interval_s - since)

    def _set_broken(self, exc: Exception) -> None:
        if not self.broken.done():
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            self.broken.set_result(detail or type(exc).__name__)
        for sent in self._unacked:
            if sent.probe is not None and not sent.probe.done():
                sent.probe.set_exception(ConnectionError(f"link {self.label} broke"))

