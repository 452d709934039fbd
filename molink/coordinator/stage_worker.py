"""StageWorker: one stage server (``molink join``): receive steps, compute, pass them on.

Four activities overlap so the compute loop never waits on the network or on
serialization::

    Forward stream (asyncio) -> inbox -> compute thread -> wire -> serializer -> outbox -> sender
      parse, validate,          queue    executor.execute  queue   thread: bytes  queue   (asyncio)
      bytes -> tensor                                              + protobuf              next hop

Steps arrive in order on one stream per hop and are computed in that order, so results
leave in the order the head sent them. A step that fails here is passed on with an error
(never silently dropped), so the head can end the affected requests with a clear message.
"""

from __future__ import annotations

import asyncio
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
from molink.transport.codec import WireFormatError, decode_step, encode_result, encode_step
from molink.transport.peers import Peer, bind, make_server, queued_messages

logger = logging.getLogger(__name__)

JOIN_DEADLINE_S = 10.0
_STOP = object()


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
        self._outbox: asyncio.Queue | None = None
        self._sender: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
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
            self._sender.cancel()
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
            self._sender.cancel()
        self._outbox = asyncio.Queue()
        target = request.next_address or request.head_address or self.head_address
        self._sender = asyncio.create_task(self._send_loop(target, last=not request.next_address))
        logger.info("%s: output goes to %s (%s)", self.label, target,
                    "head" if not request.next_address else "next stage")
        return pb.Ack()

    async def Forward(self, request_iterator, context):
        """Steps from the previous hop; each is validated, then queued for compute."""
        try:
            async for message in request_iterator:
                try:
                    step = decode_step(message)
                except WireFormatError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed step: {exc}")
                hidden = None
                if step.hidden is not None and not step.error:
                    hidden = from_raw(step.hidden, self.executor.device)
                self._inbox.put((step, hidden))
        except asyncio.CancelledError:  # the server is stopping: end the stream quietly
            return
        if False:  # pragma: no cover - keeps this an async generator (no acks are sent)
            yield pb.Ack()

    async def Health(self, request, context) -> pb.HealthReply:
        return pb.HealthReply(ready=self._outbox is not None, detail=self.label)

    # ---- compute thread ---------------------------------------------------------------------

    def _compute_loop(self) -> None:
        while (item := self._inbox.get()) is not _STOP:
            step, hidden = item
            start = time.perf_counter()
            output, error = self._compute(step, hidden)
            timings = (*step.stage_compute_s, time.perf_counter() - start)
            self._wire.put((step, output, error, timings))
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
            message = self._message(step, output, error, timings)
            if self._outbox is None:
                logger.error("%s: step %d computed before a route was configured; dropped",
                             self.label, step.plan.step_id)
                continue
            self._loop.call_soon_threadsafe(self._outbox.put_nowait, message)

    def _message(self, step, output, error: str, timings: tuple[float, ...]):
        """The message to send on: the next step message, or the result for the head."""
        plan = step.plan
        if self.executor.is_last:
            result = output if output is not None else StepOutput(plan.step_id,
                                                                  microbatch_id=plan.microbatch_id)
            return encode_result(result, error=error, stage_compute_s=timings)
        return encode_step(plan, None if error else to_raw(output), reset=step.reset, error=error,
                           stage_compute_s=timings)

    # ---- sender -------------------------------------------------------------------------------

    async def _send_loop(self, address: str, last: bool) -> None:
        peer = Peer(address, self.token)
        messages = queued_messages(self._outbox)
        try:
            if last:
                call = pb_grpc.HeadStub(peer.channel).Results(messages, metadata=peer.metadata)
            else:
                call = pb_grpc.StageStub(peer.channel).Forward(messages, metadata=peer.metadata)
            async for _ack in call:
                pass
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            logger.error("%s: stream to %s ended: %s", self.label, address,
                         exc.details() or exc.code().name)
        finally:
            await peer.close()
