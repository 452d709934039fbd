"""StageWorker: one stage server (``molink join``): receive steps, compute, pass them on.

Four activities overlap so the compute loop never waits on the network or on
serialization::

    Forward stream (asyncio) -> inbox -> compute thread -> wire -> serializer -> HopSender
      parse, validate, ack,     queue    executor.execute  queue   thread: bytes   (asyncio)
      bytes -> tensor                                              (+compress)    next hop

A message may hold a fragment of a step (a prefill cut along the token dimension by the
previous hop's link scheduler): each fragment is computed as it arrives, so transfer and
compute overlap, and passed on as its own payload. The last stage gathers a step's
fragments and returns one result when all of its tokens arrived. A step that fails here is
passed on with an error (never silently dropped), so the head can end the affected
requests with a clear message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time

import grpc

from molink.messages import StepOutput
from molink.runtime.stage_executor import StageExecutor
from molink.runtime.wire_tensor import from_raw, to_raw
from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.auth import REFUSAL
from molink.transport.codec import WireFormatError, decode_step, encode_result
from molink.transport.hop_sender import HopSender, OutgoingStep
from molink.transport.peers import Peer, bind, make_server

logger = logging.getLogger(__name__)

JOIN_DEADLINE_S = 10.0
_STOP = object()
_EWMA = 0.2


@dataclasses.dataclass
class _Gathering:
    """The fragments of one step the last stage has computed so far."""

    output: StepOutput
    tokens: int = 0
    error: str = ""
    timings: list[float] = dataclasses.field(default_factory=list)


class StageRefused(Exception):
    """The head refused this stage; the message says why."""


class StageWorker(pb_grpc.StageServicer):
    def __init__(self, executor: StageExecutor, info: pb.StageInfo, token: str,
                 head_address: str) -> None:
        self.executor = executor
        self.info = info
        self.token = token
        self.head_address = head_address
        self.label = f"layers {info.start_layer}:{info.end_layer}"
        self._inbox: queue.Queue = queue.Queue()
        self._sender: HopSender | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gathering: dict[int, _Gathering] = {}  # last stage: step id -> fragments so far
        self._compute_s_per_token = 0.0  # EWMA, for choosing the wire compression
        self._server: grpc.aio.Server | None = None
        self._wire: queue.Queue = queue.Queue()  # computed steps waiting to be serialized
        self.epoch = 0
        self.num_steps_computed = 0

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        self._loop = asyncio.get_running_loop()
        self._server = make_server(self.token)
        pb_grpc.add_StageServicer_to_server(self, self._server)
        bound = bind(self._server, host, port)
        await self._server.start()
        for target, name in ((self._compute_loop, "molink-compute"),
                             (self._serialize_loop, "molink-serialize")):
            threading.Thread(target=target, daemon=True, name=name).start()
        return bound

    async def join(self) -> str:
        """Ask the head to admit this stage; returns the stage id or raises StageRefused."""
        peer = Peer(self.head_address, self.token)
        try:
            reply = await pb_grpc.HeadStub(peer.channel).Join(
                pb.JoinRequest(stage=self.info), metadata=peer.metadata, timeout=JOIN_DEADLINE_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise StageRefused(REFUSAL) from None
            raise StageRefused(f"cannot reach the head at {self.head_address}: "
                               f"{exc.details() or exc.code().name}") from None
        finally:
            await peer.close()
        if not reply.accepted:
            raise StageRefused(reply.reason)
        return reply.stage_id

    async def stop(self) -> None:
        self._inbox.put(_STOP)
        if self._sender is not None:
            await self._sender.close()
        if self._server is not None:
            await self._server.stop(grace=0.5)

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    # ---- RPCs -----------------------------------------------------------------------------

    async def Configure(self, request: pb.Route, context) -> pb.Ack:
        """The head tells this stage where its output goes (a new route after failures)."""
        if request.epoch < self.epoch:
            return pb.Ack()
        self.epoch = request.epoch
        if self._sender is not None:
            await self._sender.close()
        target = request.next_address or request.head_address or self.head_address
        last = not request.next_address
        try:
            sender = HopSender(target, self.token, to_head=last,
                               schedule=request.link_schedule or "molink",
                               compression=request.compression or "none",
                               max_chunk_tokens=request.max_chunk_tokens or None,
                               label=f"{self.label} -> {'head' if last else target}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        sender.start()
        sender.broken.add_done_callback(
            lambda f: logger.error("%s: stream to %s ended: %s", self.label, target, f.result()))
        self._sender = sender
        logger.info("%s: output goes to %s (%s; link schedule %s, compression %s)", self.label,
                    target, "head" if last else "next stage", sender.schedule, sender.compression)
        return pb.Ack()

    async def Forward(self, request_iterator, context):
        """Steps (or fragments of steps) from the previous hop; each is validated, queued
        for compute and acknowledged at once (the sender times the acks)."""
        try:
            async for message in request_iterator:
                yield pb.Ack()  # first: the sender's clock measures the link, not our work
                if message.probe:
                    continue
                try:
                    step = decode_step(message)
                except WireFormatError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed step: {exc}")
                hidden = None
                if step.hidden is not None and not step.error:
                    hidden = from_raw(step.hidden, self.executor.device, self.executor.dtype)
                self._inbox.put((step, hidden))
        except asyncio.CancelledError:  # the server is stopping: end the stream quietly
            return

    async def Health(self, request, context) -> pb.HealthReply:
        return pb.HealthReply(ready=self._sender is not None, detail=self.label)

    # ---- compute thread ---------------------------------------------------------------------

    def _compute_loop(self) -> None:
        while (item := self._inbox.get()) is not _STOP:
            step, hidden = item
            start = time.perf_counter()
            output, error = self._compute(step, hidden)
            seconds = time.perf_counter() - start
            if step.plan.num_tokens and not error:
                per_token = seconds / step.plan.num_tokens
                self._compute_s_per_token += _EWMA * (per_token - self._compute_s_per_token)
            self._wire.put((step, output, error, (*step.stage_compute_s, seconds)))
        self._wire.put(_STOP)

    def _compute(self, step, hidden):
        """-> (output or None, error text): hidden states / sampled tokens of this step."""
        if step.reset:
            self.executor.reset()
        if step.error:
            return None, step.error
        try:
            output = self.executor.execute(step.plan, hidden)
            self.num_steps_computed += 1
            return output, ""
        except Exception as exc:  # one bad step must not kill the stage: report it
            logger.exception("%s failed step %d", self.label, step.plan.step_id)
            return None, (f"stage {self.label} failed step {step.plan.step_id}: "
                          f"{type(exc).__name__}: {exc}")

    # ---- serializer thread --------------------------------------------------------------------

    def _serialize_loop(self) -> None:
        while (item := self._wire.get()) is not _STOP:
            step, output, error, timings = item
            sender = self._sender
            if sender is None:
                logger.error("%s: step %d computed before a route was configured; dropped",
                             self.label, step.plan.step_id)
                continue
            if self.executor.is_last:
                if step.reset:
                    self._gathering.clear()
                message = self._gather(step, output, error, timings)
                if message is not None:
                    self._loop.call_soon_threadsafe(sender.submit_result, message)
                continue
            rows = None
            if not error:
                compression = sender.wire_compression(
                    str(output.dtype).removeprefix("torch."), output.shape[-1],
                    self._compute_s_per_token)
                rows = to_raw(output, compression)
            outgoing = OutgoingStep(step.plan, rows, step.step_num_tokens, reset=step.reset,
                                    error=error, stage_compute_s=timings, hops=step.hops,
                                    part=step.part)
            self._loop.call_soon_threadsafe(sender.submit, outgoing)

    def _gather(self, step, output, error: str, timings: tuple[float, ...]):
        """Last stage: add one computed fragment; the step's result once all tokens are in."""
        plan = step.plan
        gathering = self._gathering.setdefault(
            plan.step_id, _Gathering(StepOutput(plan.step_id, microbatch_id=plan.microbatch_id)))
        gathering.tokens += plan.num_tokens
        gathering.error = gathering.error or error
        if output is not None:
            gathering.output.sampled_token_ids.update(output.sampled_token_ids)
            gathering.output.logprobs.update(output.logprobs)
        if len(gathering.timings) < len(timings):
            gathering.timings.extend([0.0] * (len(timings) - len(gathering.timings)))
        for i, seconds in enumerate(timings):
            gathering.timings[i] += seconds
        if gathering.tokens < step.step_num_tokens:
            return None
        del self._gathering[plan.step_id]
        return encode_result(gathering.output, error=gathering.error,
                             stage_compute_s=tuple(gathering.timings),
                             hops=step.hops)  # the sender adds its own hop's report
