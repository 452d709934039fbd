"""StageWorker: one stage server (``molink join``): receive steps, compute, pass them on.

Four activities overlap so the compute loop never waits on the network or on
serialization::

    Forward stream (asyncio) -> inbox -> compute thread -> wire -> serializer -> HopSender
      parse, validate, ack,     queue    executor.execute  queue   thread: bytes   (asyncio)
      bytes -> tensor                                              (+compress)    next hop
      (a small output, a decode step's, skips the serializer when nothing waits there)

A message may hold a chunk of a step (a prefill cut along the token dimension by the
previous hop's link scheduler): each chunk is computed as it arrives, so transfer and
compute overlap, and passed on as its own payload. While decodes run, they are computed
ahead of waiting prefill chunks, and a chunk is cut to this stage's stall bound
(``stage.inbox``). The last stage gathers a step's
chunks and returns one result when all of its tokens arrived. A step that fails here is
passed on with an error (never silently dropped), so the head can end the affected
requests with a clear message.

Membership is kept by the stage itself, so processes can start in any order and survive a
head restart::

    join (retry with backoff while the head is unreachable; exit only on a real refusal)
      -> watch the head (Health with our stage id every few seconds)
      -> the head restarted, forgot us, or shut down (Release): drop every request's
         state, join again

A stage leaving on purpose (``leave``: SIGTERM, Ctrl-C) asks the head first; the head
answers once its requests are moved to a standby or drained.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

import grpc

from molink.runtime.intra_op import serial_here
from molink.runtime.stage_executor import StageExecutor
from molink.runtime.wire_tensor import from_raw
from molink.stage.compute import StageCompute, small
from molink.stage.gathering import Gatherer, Timings
from molink.stage.head_client import HeadUnreachable, StageRefused, call_join
from molink.stage.inbox import ChunkSizer, StageInbox
from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.codec import decode_step
from molink.transport.dedup import DuplicateFilter, take_each
from molink.transport.hop_sender import HopSender
from molink.transport.outgoing import OutgoingStep
from molink.transport.peers import (
    Peer,
    PeerSecurity,
    PeerUnreachable,
    bind,
    error_detail,
    make_server,
)

logger = logging.getLogger(__name__)

JOIN_RETRY_MAX_S = 10.0  # backoff between join attempts while the head is unreachable
HEAD_WATCH_INTERVAL_S = 2.0
HEAD_WATCH_DEADLINE_S = 3.0
HEAD_LOST_AFTER_S = 30.0  # unreachable this long: its requests are gone, free their state
THREAD_STOP_S = 10.0  # at stop: how long the current step may take to end
LEAVE_MARGIN_S = 15.0  # a leave is answered within the drain timeout plus this
_STOP = object()
_RESET = object()  # drop every request's state (a new head, or the head is gone)


class StageWorker(pb_grpc.StageServicer):
    def __init__(self, executor: StageExecutor, info: pb.StageInfo, security: PeerSecurity,
                 head_address: str) -> None:
        self.executor = executor
        self.compute = StageCompute(executor)
        self.info = info
        self.info.fingerprint = security.fingerprint
        self.security = security
        self.head_address = head_address
        self.head_fingerprint = ""  # the head's certificate, learnt when joining
        self.label = f"layers {info.start_layer}:{info.end_layer}"
        self._inbox = StageInbox(ChunkSizer())  # decodes first; prefill cut while they run
        self._sender: HopSender | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gathering = Gatherer()  # last stage: steps whose chunks are not all in
        self._server: grpc.aio.Server | None = None
        self._wire: queue.Queue = queue.Queue()  # computed steps waiting to be serialized
        self._received = DuplicateFilter()
        self.epoch = 0
        self.stage_id = ""
        self.head_instance = ""
        self.address = ""  # where the head reaches this stage (learnt at join)
        self._released: asyncio.Event | None = None  # set by the head's Release
        self._threads: list[threading.Thread] = []
        self._stopping = False  # the compute thread skips what is still queued

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        self._loop = asyncio.get_running_loop()
        self._released = asyncio.Event()
        self._server = make_server(self.security)
        pb_grpc.add_StageServicer_to_server(self, self._server)
        bound = bind(self._server, host, port, self.security)
        await self._server.start()
        for target, name in ((self._compute_loop, "molink-compute"),
                             (self._serialize_loop, "molink-serialize")):
            thread = threading.Thread(target=target, daemon=True, name=name)
            thread.start()
            self._threads.append(thread)
        return bound

    async def join(self) -> str:
        """Ask the head to admit this stage once; returns the stage id. Raises StageRefused
        (a real refusal: token, model, dtype, layers) or HeadUnreachable."""
        reply, head_fingerprint = await call_join(self.head_address, self.security, self.info)
        if not reply.accepted:
            raise StageRefused(reply.reason)
        self.head_fingerprint = head_fingerprint
        self.stage_id, self.head_instance = reply.stage_id, reply.head_instance
        self.address = reply.address
        return reply.stage_id

    async def keep_joined(self, on_joined=None) -> None:
        """Join, then stay joined for as long as this stage runs: wait for the head while
        it is unreachable, join again when it restarts or forgets this stage. Returns only
        by raising StageRefused (a reason no retry can fix)."""
        while True:
            await self._join_with_retry()
            if on_joined is not None:
                on_joined(self)
            await self._watch_head()
            await self._forget_requests()

    async def _join_with_retry(self) -> None:
        backoff, last_log = 1.0, 0.0
        while True:
            try:
                await self.join()
                return
            except HeadUnreachable as exc:
                now = time.monotonic()
                if now - last_log > 30.0:
                    logger.warning("%s: waiting for the head at %s (%s); retrying", self.label,
                                   self.head_address, exc)
                    last_log = now
            await asyncio.sleep(backoff)
            backoff = min(JOIN_RETRY_MAX_S, backoff * 2)

    async def _watch_head(self) -> None:
        """Until the head restarted (another instance) or no longer counts this stage as a
        member; a head unreachable for HEAD_LOST_AFTER_S frees every request's state."""
        peer = None
        unreachable_since = None
        self._released.clear()
        try:
            while True:
                try:
                    await asyncio.wait_for(self._released.wait(), HEAD_WATCH_INTERVAL_S)
                    return  # the head shut down and said so
                except TimeoutError:
                    pass
                try:
                    peer = peer or await Peer.open(self.head_address, self.security,
                                                   timeout_s=HEAD_WATCH_DEADLINE_S)
                    reply = await pb_grpc.HeadStub(peer.channel).Health(
                        pb.HealthRequest(stage_id=self.stage_id), metadata=peer.metadata,
                        timeout=HEAD_WATCH_DEADLINE_S)
                except (grpc.aio.AioRpcError, PeerUnreachable) as exc:
                    if peer is not None:  # opened afresh next time: the head may be new
                        await peer.close()
                        peer = None
                    now = time.monotonic()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since > HEAD_LOST_AFTER_S:
                        logger.warning("%s: the head at %s has not answered for %.0f s (%s); "
                                       "joining again when it is back", self.label,
                                       self.head_address, now - unreachable_since,
                                       error_detail(exc))
                        return
                    continue
                unreachable_since = None
                if reply.head_instance != self.head_instance:
                    logger.warning("%s: the head at %s restarted; joining it again", self.label,
                                   self.head_address)
                    return
                if not reply.member:
                    logger.warning("%s: the head no longer routes through this stage; "
                                   "joining again", self.label)
                    return
        finally:
            if peer is not None:
                await peer.close()

    async def _forget_requests(self) -> None:
        """The head that planned our requests is gone or dropped us: free their state and
        stop sending what was left for it."""
        self.epoch = 0
        self.stage_id = ""
        self._inbox.put(_RESET)
        sender, self._sender = self._sender, None
        if sender is not None:
            await sender.close()

    async def leave(self, drain_timeout_s: float) -> str:
        """Tell the head this stage is leaving; returns when the head let it go (its requests
        moved to a standby, or drained), with what the head did."""
        if not self.stage_id:
            return "not joined"
        try:
            peer = await Peer.open(self.head_address, self.security, timeout_s=HEAD_WATCH_DEADLINE_S)
        except PeerUnreachable as exc:
            return f"the head is unreachable ({exc})"
        try:
            reply = await pb_grpc.HeadStub(peer.channel).Leave(
                pb.LeaveRequest(stage_id=self.stage_id, drain_timeout_s=drain_timeout_s),
                metadata=peer.metadata, timeout=drain_timeout_s + LEAVE_MARGIN_S)
            return reply.detail
        except grpc.aio.AioRpcError as exc:
            return f"the head did not answer ({error_detail(exc)})"
        finally:
            await peer.close()

    async def stop(self) -> None:
        """Stop serving; returns once the compute and serializer threads ended (a process
        that exits while a thread is inside a kernel may abort)."""
        self._stopping = True
        self._inbox.put(_STOP)
        if self._sender is not None:
            await self._sender.close()
        if self._server is not None:
            await self._server.stop(grace=0.5)
        for thread in self._threads:
            await asyncio.to_thread(thread.join, THREAD_STOP_S)

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    # ---- RPCs -----------------------------------------------------------------------------

    async def Configure(self, request: pb.Route, context) -> pb.Ack:
        """The head tells this stage where its output goes (a new route after failures).
        Answers once this stage has connected to the next hop and measured it, so the head
        knows the route works before it sends traffic; a failure names both ends."""
        if request.epoch < self.epoch:
            return pb.Ack()
        self.epoch = request.epoch
        if self._sender is not None:
            await self._sender.close()
            self._sender = None
        target = request.next_address or request.head_address or self.head_address
        last = not request.next_address
        next_label = "the head" if last else (request.next_label or "the next stage")
        if target not in next_label:
            next_label = f"{next_label} at {target}"
        try:
            sender = HopSender(target, self.security, to_head=last,
                               expected_fingerprint=(self.head_fingerprint if last
                                                     else request.next_fingerprint),
                               schedule=request.link_schedule or "molink",
                               compression=request.compression or "none",
                               max_chunk_tokens=request.max_chunk_tokens or None,
                               label=f"{self.label} -> {'head' if last else target}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        sender.start()
        try:
            await sender.wait_connected()
        except ConnectionError as exc:
            await sender.close()
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{self.label} cannot reach {next_label}: {exc}")
        sender.broken.add_done_callback(
            lambda f: logger.error("%s: stream to %s lost: %s", self.label, target, f.result()))
        self._sender = sender
        self._inbox.sizer.factor = request.decode_stall_factor
        logger.info("%s: output goes to %s (link schedule %s, compression %s)",
                    self.label, next_label, sender.schedule, sender.compression)
        return pb.Ack()

    async def Forward(self, request_iterator, context):
        """Steps (or chunks of steps) from the previous hop; each is validated, queued
        for compute, then acknowledged (never before: an acknowledged step is never lost
        when the stream breaks). Repeats of a re-opened stream and steps of an older route
        are dropped."""
        def take(step) -> None:
            if step.epoch < self.epoch:
                return  # planned for an older route
            hidden = None
            if step.hidden is not None and not step.error:
                hidden = from_raw(step.hidden, self.executor.device, self.executor.dtype)
            self._inbox.put((step, hidden, time.monotonic()))

        async for ack in take_each(request_iterator, context, decode_step, self._received,
                                   take, "step"):
            yield ack

    async def Release(self, request: pb.ReleaseRequest, context) -> pb.Ack:
        """The head shuts down: free every request's state and join again when it is back."""
        if request.head_instance == self.head_instance and self._released is not None:
            logger.info("%s: %s; freeing every request's state", self.label,
                        request.reason or "the head released this stage")
            self._released.set()
        return pb.Ack()

    async def Health(self, request, context) -> pb.HealthReply:
        """Ready once routed; not ready, with the reason, when the output hop is lost."""
        sender, busy_s = self._sender, self.compute.busy_s()
        if sender is not None and sender.broken.done():
            lost = f"hop {sender.label} lost: {sender.broken.result()}"
            return pb.HealthReply(ready=False, compute_busy_s=busy_s, detail=lost, lost_hop=lost)
        return pb.HealthReply(ready=sender is not None, detail=self.label, compute_busy_s=busy_s)

    # ---- compute thread ---------------------------------------------------------------------

    def _compute_loop(self) -> None:
        while (item := self._inbox.get()) is not _STOP:
            if self._stopping:
                continue  # stopping: what is queued is not computed
            if item is _RESET:
                self.executor.reset()
                self._inbox.sizer.forget_all()
                self._to_wire(_RESET)
                continue
            step, hidden, arrived_at = item
            waited = time.monotonic() - arrived_at
            output, error, seconds = self._compute(step, hidden)
            self._inbox.sizer.record(step.plan, seconds)
            self._to_wire((step, output, error, Timings((*step.stage_compute_s, seconds),
                                                         (*step.stage_wait_s, waited),
                                                         time.monotonic())))
        self._wire.put(_STOP)

    def _to_wire(self, item) -> None:
        """A computed step (or ``_RESET``) to the serializer thread; a small one is passed
        on here instead when nothing waits there, so the order stays that of the compute
        (the queue's unfinished count: only this thread adds to it, so 0 stays 0 meanwhile)."""
        if item is not _RESET and small(item[1]) and not self._wire.unfinished_tasks:
            self._pass_on(item)
        else:
            self._wire.put(item)

    def _compute(self, step, hidden):
        """-> (output or None, error text, seconds): hidden states / sampled tokens."""
        if step.reset:
            self.executor.reset()
        if step.error:
            return None, step.error, 0.0
        try:
            output, seconds = self.compute.run(step.plan, hidden)
            return output, "", seconds
        except Exception as exc:  # one bad step must not kill the stage: report it
            logger.exception("%s failed step %d", self.label, step.plan.step_id)
            return None, (f"stage {self.label} failed step {step.plan.step_id}: "
                          f"{type(exc).__name__}: {exc}"), 0.0

    # ---- serializer thread --------------------------------------------------------------------

    def _serialize_loop(self) -> None:
        serial_here()  # casts on one core: the compute thread's team stays the only one
        while (item := self._wire.get()) is not _STOP:
            if item is _RESET:
                self._gathering.clear()
            else:
                self._pass_on(item)
            self._wire.task_done()  # after it went on: the compute thread may pass on again

    def _pass_on(self, item) -> None:
        """A computed step to the next hop: its activations encoded for it (the last stage:
        its result, once every chunk of the step is in)."""
        step, output, error, times = item
        sender = self._sender
        if sender is None or step.epoch < self.epoch:
            if step.epoch >= self.epoch and not self._stopping:
                logger.error("%s: step %d computed before a route was configured; "
                             "dropped", self.label, step.plan.step_id)
            return  # else: planned for a route that is gone
        if self.executor.is_last:
            if step.reset:
                self._gathering.clear()
            message = self._gathering.add(step, output, error, times)
            if message is not None:
                self._loop.call_soon_threadsafe(sender.submit_result, message, times.computed_at)
            return
        activations, error = self.compute.encode_or_error(
            output, error, sender, f"stage {self.label}, step {step.plan.step_id}")
        outgoing = OutgoingStep(step.plan, activations, step.step_num_tokens, reset=step.reset,
                                error=error, stage_compute_s=times.compute_s, hops=step.hops,
                                part=step.part, epoch=step.epoch, stage_wait_s=times.wait_s,
                                computed_at=times.computed_at)
        self._loop.call_soon_threadsafe(sender.submit, outgoing)
