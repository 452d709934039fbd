"""PipelineHead: the head node of a multi-node pipeline (``molink serve``).

The engine loop (``HeadLoop``: scheduler, micro-batches in flight, results, deadlines)
knows no sockets; this node wraps it the way vLLM's EngineCoreProc wraps EngineCore. It
serves the stages' RPCs (join, results, health), keeps the membership, sets up the route,
watches every stage, and opens or closes the loop as the pipeline comes and goes.

A stage that stops answering health checks, whose outgoing hop is lost, or whose compute
is stuck closes the loop: the requests in the pipeline fail with ``StageUnavailable``
naming it; the head stays up and reports the missing range, and the stage (which re-joins
by itself when it can) or a replacement restores service. Nothing waits forever: a step
without a result within ``max(10 s, 10 x expected)`` closes it too.

Addresses: a stage that does not advertise one is reached at the IP address its join came
from and the port it listens on; results come back to the address the stages dialed to
join, unless the head advertises one. Before traffic flows, every hop has connected and
measured its link (``Configure`` answers only then), so a route that cannot work is
reported with both ends and the address tried, and retried until it works.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator

import grpc

from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.head_loop import HeadLoop, PipelineNotReady, StageUnavailable
from molink.coordinator.membership import Membership, ModelIdentity, StageMember
from molink.coordinator.tokenizer import eos_token_ids, load_tokenizer
from molink.messages import LinkReport
from molink.model.loader import config_fingerprint, load_config, resolve_dtype
from molink.outputs import RequestOutput
from molink.runtime.host import cpu_cores, host_id
from molink.runtime.stage_executor import StageExecutor, resolve_device
from molink.sampling_params import SamplingParams
from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.codec import decode_result
from molink.transport.dedup import DuplicateFilter, take_each
from molink.transport.hop_sender import HopSender
from molink.transport.peers import Peer, PeerSecurity, PeerUnreachable, bind, make_server, peer_host

__all__ = ["HopStats", "PipelineHead", "PipelineNotReady", "StageUnavailable"]

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
HEALTH_DEADLINE_S = 2.0
HEALTH_FAILURES_BEFORE_DOWN = 2
CONFIGURE_DEADLINE_S = 20.0  # a stage answers once it connected to its next hop
ROUTE_RETRY_S = 3.0  # a route that could not be set up is tried again this often


@dataclasses.dataclass
class HopStats:
    """One hop of the pipeline as its sender measures it."""

    label: str  # "head -> layers 2:4", "layers 4:6 -> head"
    bandwidth_bps: float  # bits per second, measured (0: not yet)
    latency_s: float  # one way, measured
    bytes_sent: int
    messages_sent: int
    tokens_sent: int
    compression: str


class PipelineHead(pb_grpc.HeadServicer):
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, config: HeadConfig, *,
                 security: PeerSecurity) -> None:
        self.config = config
        self.security = security
        self.arch = load_config(model_config.model).arch
        self.cache_config = cache_config
        executor = None
        if config.head_layers is not None:
            start, end = config.head_layers
            executor = StageExecutor(model_config.replace(start_layer=start, end_layer=end),
                                     cache_config, max_num_seqs=scheduler_config.max_num_seqs)
        dtype = resolve_dtype(model_config.dtype, self.arch, resolve_device(model_config.device))
        self.membership = Membership(
            ModelIdentity(config_fingerprint(model_config.model), str(dtype).removeprefix("torch."),
                          cache_config.block_size, self.arch.num_layers), config.head_layers)
        tokenizer = load_tokenizer(model_config.tokenizer or model_config.model)
        eos = eos_token_ids(tokenizer, self.arch.eos_token_ids, model_config.model)
        if executor is not None:
            executor.eos_token_ids = eos
        self.loop = HeadLoop(tokenizer=tokenizer, arch=self.arch, eos_token_ids=eos,
                             executor=executor, scheduler_config=scheduler_config,
                             block_size=cache_config.block_size,
                             model_max_len=model_config.max_model_len,
                             num_microbatches=config.num_microbatches,
                             hop_links=lambda: self.hop_stats(),
                             shared_cores=lambda: self._shared_cores(),
                             not_ready_reason=lambda: self.health()[1])
        self.ready_callbacks: list = []  # called each time the pipeline becomes ready
        self.instance = secrets.token_hex(8)  # stages notice a restarted head by it
        # Route epochs only grow, across restarts too, so a stage or a late result of an
        # older head's route is never mistaken for the current one.
        self._epoch = time.time_ns() // 1_000_000
        self.route_error = ""  # why the last route could not be set up ("" if none)
        self._ready = False
        self._stopping = False
        self._configuring = False
        self._ready_event: asyncio.Event | None = None
        self._peers: dict[str, Peer] = {}  # stage id -> open channel (health, configure)
        self._first_hop: HopSender | None = None
        self._received = DuplicateFilter()
        self._tasks: set[asyncio.Task] = set()  # keeps background tasks alive until done
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task | None = None
        self.address = ""  # where this head listens for stages (host:port)
        self.advertised_address = ""  # where stages send results ("": where they dialed)

    # ---- what the API and the metrics see ---------------------------------------------------

    async def generate(self, prompt, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; raises PipelineNotReady / StageUnavailable /
        ValueError. The request is queued before the first await."""
        async for output in self.loop.generate(prompt, params, request_id):
            yield output

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    @property
    def executor(self):
        return self.loop.executor

    @property
    def scheduler(self):
        return self.loop.scheduler

    @property
    def tokenizer(self):
        return self.loop.tokenizer

    @property
    def stats(self):
        return self.loop.stats

    @property
    def listeners(self) -> list:
        return self.loop.listeners

    @property
    def max_model_len(self) -> int:
        return self.loop.max_model_len

    @property
    def stage_compute_s(self) -> list[float]:
        return self.loop.stage_compute_s

    @property
    def num_microbatches(self) -> int:
        return self.loop.num_microbatches

    @property
    def num_in_flight(self) -> int:
        """Plans in the pipeline now."""
        return self.loop.num_in_flight

    @property
    def ready(self) -> bool:
        return self._ready

    def health(self) -> tuple[bool, str]:
        if self._ready:
            return True, "serving all layers"
        if self.membership.complete:
            return False, f"setting up the route: {self.route_error or 'connecting the stages'}"
        return False, f"layers {self.membership.describe_missing()} are not served"

    def hop_stats(self) -> list[HopStats]:
        """Every hop in pipeline order (the last: results back to the head), as measured."""
        labels = self.stage_labels()
        if self.executor is None:
            labels = ["head", *labels]
        hops: list[LinkReport] = list(self.loop.hops)
        if self._first_hop is not None:
            own = self._first_hop.report()
            hops = [own, *hops[1:]] if hops else [own]
        stats = []
        for i, hop in enumerate(hops[:len(labels)]):
            target = labels[i + 1] if i + 1 < len(labels) else "head"
            stats.append(HopStats(f"{labels[i]} -> {target}", hop.bandwidth_bps, hop.latency_s,
                                  hop.bytes_sent, hop.messages_sent, hop.tokens_sent,
                                  hop.compression))
        return stats

    def stage_labels(self) -> list[str]:
        """Every stage in pipeline order, the head's own layers first when it has some."""
        labels = []
        if self.membership.head_range is not None:
            a, b = self.membership.head_range
            labels.append(f"head layers {a}:{b}")
        return labels + [m.label for m in self.membership.ordered()]

    def describe(self) -> str:
        return (" -> ".join(self.stage_labels())
                + f"; {self.num_microbatches} micro-batches in flight")

    def _shared_cores(self) -> int | None:
        """Cores of the one machine whose CPUs compute every stage, if that is the case (the
        stages then compete for its cores, a resource of its own for the chooser)."""
        members = self.membership.ordered()
        computes = [(m.host_id, m.device, m.cpu_cores) for m in members if m.device != "emulated"]
        if self.executor is not None:
            computes.append((host_id(), self.executor.device.type, cpu_cores()))
        if len(computes) < 2 or len({(h, d) for h, d, _ in computes}) != 1 \
                or computes[0][1] != "cpu" or not computes[0][0]:
            return None
        return max(1, computes[0][2])

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str, peer_port: int, advertise: str | None = None) -> int:
        """Listen for stages on host:peer_port; ``advertise`` (HOST:PORT) is where stages
        send results when it is not the address they dialed (NAT, port forwarding)."""
        self._ready_event = asyncio.Event()
        self._server = make_server(self.security)
        pb_grpc.add_HeadServicer_to_server(self, self._server)
        port = bind(self._server, host, peer_port, self.security)
        await self._server.start()
        self.address = f"{host}:{port}"
        self.advertised_address = advertise or ""
        self._health_task = asyncio.create_task(self._health_loop())
        if self.membership.complete:  # the head serves every layer itself
            await self._on_complete()
        return port

    def begin_stop(self) -> None:
        """From now on, stages going away is expected: no failure handling, no alarms (the
        first hop is closed, so it does not try to re-open a stream to a stopped stage)."""
        self._stopping = True
        self._spawn(self._close_first_hop())

    async def stop(self) -> None:
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
        await self._close_first_hop()
        peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            await peer.close()
        if self._server is not None:
            await self._server.stop(grace=0.5)
        self.loop.shutdown()

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every layer is served (TimeoutError naming the missing ones otherwise)."""
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"pipeline not ready after {timeout_s} s: "
                               f"{self.health()[1]}") from None

    def _spawn(self, coroutine) -> None:
        """Run a background task, holding a reference so it is not collected mid-flight."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- RPCs from stages ---------------------------------------------------------------------

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        info = request.stage
        address = info.address or self._address_of(info, context.peer())
        await self._drop_dead_overlaps(info.start_layer, info.end_layer)
        min_blocks = self.scheduler.block_pool.num_blocks if self.scheduler else 1
        reason = self.membership.check_join(info.start_layer, info.end_layer, address,
                                            info.model_fingerprint, info.dtype, info.block_size,
                                            info.num_layers)
        if reason is None and info.num_blocks < min_blocks:
            reason = (f"the stage holds {info.num_blocks} KV blocks; the running pipeline "
                      f"uses {min_blocks}")
        if reason is not None:
            logger.warning("refused stage %s (layers %d:%d): %s", address, info.start_layer,
                           info.end_layer, reason)
            return pb.JoinReply(accepted=False, reason=reason)
        member = self.membership.add(info.start_layer, info.end_layer, address,
                                     info.num_blocks)
        member.host_id, member.device, member.cpu_cores = info.host_id, info.device, info.cpu_cores
        member.fingerprint = info.fingerprint
        missing = self.membership.describe_missing()
        logger.info("stage joined: %s, %s KV blocks%s", member.label, f"{info.num_blocks:,}",
                    f" (still missing layers {missing})" if missing else "")
        if self.membership.complete:
            self._spawn(self._on_complete())
        return pb.JoinReply(accepted=True, stage_id=member.stage_id, head_instance=self.instance,
                            address=address)

    @staticmethod
    def _address_of(info: pb.StageInfo, peer: str) -> str:
        """A stage that advertises nothing is reached where its join came from."""
        host = peer_host(peer)
        return f"{host}:{info.port}" if host and info.port else ""

    async def _drop_dead_overlaps(self, start: int, end: int) -> None:
        """A stage restarted before its old self was found dead would be refused for
        overlapping it: check the overlapping members now and drop those that are gone."""
        for member in list(self.membership.stages.values()):
            if member.start_layer < end and start < member.end_layer:
                if not await self._answers_health(member):
                    self._on_stage_failure(member, "replaced by a new stage for its layers "
                                                   "(it no longer answers)")

    async def Results(self, request_iterator, context):
        """Results from the last stage; taken, then acknowledged (an acknowledged result
        is never lost). Repeats after a re-opened stream are dropped; results of an older
        route are dropped by the loop."""
        def take(result) -> None:
            self.loop.on_result(result.output, result.error, result.stage_compute_s,
                                result.hops, epoch=result.epoch)

        async for ack in take_each(request_iterator, context, decode_result, self._received,
                                   take, "result"):
            yield ack

    async def Health(self, request, context) -> pb.HealthReply:
        """For monitors, and for stages asking whether they are still members."""
        ready, detail = self.health()
        return pb.HealthReply(ready=ready, detail=detail, head_instance=self.instance,
                              member=request.stage_id in self.membership.stages)

    # ---- the route ------------------------------------------------------------------------------

    async def _on_complete(self) -> None:
        """Every layer is served: wire the route (each node connects to the next, the last
        to the head), then open the loop. A route that cannot be set up is reported and
        tried again by the health loop."""
        if self._configuring or self._ready or self._stopping:
            return
        self._configuring = True
        try:
            await self._set_up_route()
        finally:
            self._configuring = False

    async def _set_up_route(self) -> None:
        self._epoch += 1
        epoch = self._epoch
        stages = self.membership.ordered()
        try:
            # Last stage first: a stage's Configure answers once it reached its next hop.
            for i in reversed(range(len(stages))):
                following = stages[i + 1] if i + 1 < len(stages) else None
                await self._configure(stages[i], following)
            await self._open_first_hop(stages[0] if stages else None)
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            self.route_error = detail
            self.stats.num_route_failures += 1
            logger.error("could not set up the route %s: %s (retrying every %.0f s)",
                         " -> ".join(self.stage_labels()), detail, ROUTE_RETRY_S)
            await self._close_first_hop()
            return
        if epoch != self._epoch or not self.membership.complete:
            return  # the membership changed meanwhile: the next attempt wires the new one
        self.route_error = ""
        counts = [m.num_blocks for m in stages]
        if self.executor is not None:
            counts.append(self.executor.num_blocks)
        self._ready = True
        self.loop.open(epoch, self._first_hop, min(counts),
                       num_stages=len(stages) + (self.executor is not None))
        self._ready_event.set()
        for callback in self.ready_callbacks:
            callback()
        logger.info("pipeline ready: %s", self.describe())

    async def _configure(self, member: StageMember, following: StageMember | None) -> None:
        peer = await self._stage_peer(member)
        config = self.config
        try:
            await pb_grpc.StageStub(peer.channel).Configure(
                pb.Route(next_address=following.address if following else "",
                         next_label=following.label if following else "",
                         next_fingerprint=following.fingerprint if following else "",
                         head_address=self.advertised_address, epoch=self._epoch,
                         link_schedule=config.link_schedule, compression=config.compression,
                         max_chunk_tokens=config.max_chunk_tokens or 0),
                metadata=peer.metadata, timeout=CONFIGURE_DEADLINE_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and exc.details().startswith("layers"):
                raise  # the stage could not reach its next hop: its message names both ends
            raise ConnectionError(f"the head cannot configure {member.label}: "
                                  f"{exc.details() or exc.code().name}") from None

    async def _stage_peer(self, member: StageMember) -> Peer:
        """The head's channel to a stage, opened once (checked against the certificate the
        stage joined with) and kept while it is a member; PeerUnreachable otherwise."""
        peer = self._peers.get(member.stage_id)
        if peer is None:
            try:
                peer = await Peer.open(member.address, self.security, member.fingerprint,
                                       timeout_s=HEALTH_DEADLINE_S)
            except PeerUnreachable as exc:
                raise PeerUnreachable(f"the head cannot reach {member.label}: {exc}",
                                      exc.retryable) from None
            if member.stage_id not in self.membership.stages:  # left meanwhile
                await peer.close()
                raise PeerUnreachable(f"{member.label} left", retryable=False)
            self._peers[member.stage_id] = peer
        return peer

    async def _open_first_hop(self, first: StageMember | None) -> None:
        await self._close_first_hop()
        if first is None:
            return
        source = self.stage_labels()[0] if self.executor is not None else "head"
        label = f"{source} -> {first.label}"
        config = self.config
        sender = HopSender(first.address, self.security, to_head=False,
                           schedule=config.link_schedule, compression=config.compression,
                           max_chunk_tokens=config.max_chunk_tokens, label=label,
                           expected_fingerprint=first.fingerprint)
        sender.start()
        try:
            await sender.wait_connected()
        except ConnectionError as exc:
            await sender.close()
            raise ConnectionError(f"the head cannot reach {first.label}: {exc}") from None
        sender.broken.add_done_callback(
            lambda f: self._on_stage_failure(first, f"hop {label} lost: {f.result()}"))
        self._first_hop = sender

    async def _close_first_hop(self) -> None:
        if self._first_hop is not None:
            sender, self._first_hop = self._first_hop, None
            await sender.close()

    # ---- watching the stages --------------------------------------------------------------

    async def _health_loop(self) -> None:
        """Every second: stages answer and are not stuck, no step is overdue, and a route
        that could not be set up is tried again."""
        last_route_attempt = 0.0
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            members = list(self.membership.stages.values())
            await asyncio.gather(*(self._check_health(m) for m in members))
            if self._ready and (overdue := self.loop.overdue_step()):
                self.stats.num_steps_timed_out += 1
                self._close(f"{overdue} on the route {' -> '.join(self.stage_labels())}")
            now = time.monotonic()
            if (self.membership.complete and not self._ready and not self._configuring
                    and now - last_route_attempt > ROUTE_RETRY_S):
                last_route_attempt = now
                self._spawn(self._on_complete())

    async def _check_health(self, member: StageMember) -> None:
        try:
            peer = await self._stage_peer(member)
            reply = await pb_grpc.StageStub(peer.channel).Health(
                pb.HealthRequest(), metadata=peer.metadata, timeout=HEALTH_DEADLINE_S)
            member.consecutive_health_failures = 0
        except (grpc.aio.AioRpcError, PeerUnreachable) as exc:
            member.consecutive_health_failures += 1
            if member.consecutive_health_failures >= HEALTH_FAILURES_BEFORE_DOWN:
                detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else exc
                self._on_stage_failure(member, f"no answer to health checks ({detail})")
            return
        if self._ready and reply.lost_hop:
            self._on_stage_failure(member, reply.lost_hop)
        elif reply.compute_busy_s > self.loop.step_deadline_s(
                self.loop.scheduler_config.max_num_batched_tokens):
            self._on_stage_failure(member, f"its compute has been stuck on one step for "
                                           f"{reply.compute_busy_s:.0f} s")

    async def _answers_health(self, member: StageMember) -> bool:
        try:
            peer = await self._stage_peer(member)
            await pb_grpc.StageStub(peer.channel).Health(
                pb.HealthRequest(), metadata=peer.metadata, timeout=HEALTH_DEADLINE_S)
            return True
        except (grpc.aio.AioRpcError, PeerUnreachable):
            return False

    def _on_stage_failure(self, member: StageMember, why: str) -> None:
        if self._stopping or self.membership.remove(member.stage_id) is None:
            return  # already handled
        self.stats.num_stage_failures += 1
        peer = self._peers.pop(member.stage_id, None)
        if peer is not None:
            self._spawn(peer.close())
        message = f"stage {member.label} became unavailable: {why}"
        logger.error("%s; layers %s are no longer served", message,
                     self.membership.describe_missing())
        self._close(message)

    def _close(self, message: str) -> None:
        """Fail every request in the pipeline with ``message``; the route is set up again
        (with a new epoch, so whatever the old one still delivers is void) before traffic
        flows."""
        self._ready = False
        self._ready_event.clear()
        self._epoch += 1
        self.loop.close(message)
        self._spawn(self._close_first_hop())
