"""PipelineHead: the head node of a multi-node pipeline (``molink serve``).

The engine loop (``HeadLoop``: scheduler, micro-batches in flight, results, deadlines)
knows no sockets; this node wraps it the way vLLM's EngineCoreProc wraps EngineCore. It
serves the stages' RPCs (join, results, health), keeps the membership, sets up the route,
watches every stage, and opens or closes the loop as the pipeline comes and goes.

A stage that is lost (health checks, a lost hop, a stuck compute, an overdue step) or
leaves is replaced and its requests replayed, the streams kept open (``StageWatch``: standby
stages, ``failover_timeout_s``, draining). When the head shuts down it tells every stage to
free its requests' state (``Release``); a head that dies without a word is noticed by the
stages' health watch (a new head instance, or none for 30 s) with the same effect: request
state lives in the head, and its clients' streams end with it.

Addresses: a stage that does not advertise one is reached at the IP address its join came
from and the port it listens on; results come back to the address the stages dialed to
join, unless the head advertises one. Before traffic flows, every hop has connected and
measured its link (``Configure`` answers only then), so a route that cannot work is
reported with both ends and the address tried, and retried until it works.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator

import grpc

from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.frontend import Frontend
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.head_loop import HeadLoop, PipelineNotReady, StageUnavailable
from molink.coordinator.hop_stats import HopStats, label_hops
from molink.coordinator.join_desk import JoinDesk, planning_footprint
from molink.coordinator.membership import Membership, ModelIdentity, StageMember
from molink.coordinator.own_layers import OwnLayers
from molink.coordinator.route_wiring import RouteWiring
from molink.coordinator.stage_peers import StagePeers, stage_address
from molink.coordinator.stage_watch import ROUTE_RETRY_S, StageWatch
from molink.messages import LinkReport
from molink.model.loader import config_fingerprint, holds_int4, load_config, resolve_dtype
from molink.outputs import RequestOutput
from molink.runtime.host import cpu_cores, cpu_set, host_id, shared_cores
from molink.runtime.intra_op import compute_threads
from molink.runtime.stage_executor import StageExecutor, resolve_device
from molink.sampling_params import SamplingParams
from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.codec import decode_result
from molink.transport.dedup import DuplicateFilter, take_each
from molink.transport.peers import (
    PeerSecurity,
    PeerUnreachable,
    bind,
    error_detail,
    make_server,
)

__all__ = ["HopStats", "PipelineHead", "PipelineNotReady", "StageUnavailable"]

logger = logging.getLogger(__name__)

RELEASE_DEADLINE_S = 2.0


def _loop_attribute(name: str, doc: str = "") -> property:
    """A read-only view of ``self.loop.<name>``."""
    return property(lambda self: getattr(self.loop, name), doc=doc)


class PipelineHead(pb_grpc.HeadServicer):
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, config: HeadConfig, *,
                 security: PeerSecurity) -> None:
        self.config = config
        self.security = security
        loaded = load_config(model_config.model)
        self.arch = loaded.arch
        self.cache_config = cache_config
        self.frontend = Frontend(model_config, self.arch)  # a bad tokenizer fails before loading
        executor = None
        if config.head_layers is not None:
            start, end = config.head_layers
            executor = StageExecutor(model_config.replace(start_layer=start, end_layer=end),
                                     cache_config, max_num_seqs=scheduler_config.max_num_seqs)
        dtype = resolve_dtype(model_config.dtype, self.arch, resolve_device(model_config.device),
                              holds_int4(loaded, model_config.quantization))
        self.membership = Membership(
            ModelIdentity(config_fingerprint(model_config.model), str(dtype).removeprefix("torch."),
                          cache_config.block_size, self.arch.num_layers), config.head_layers)
        self._own = OwnLayers(model_config, cache_config, scheduler_config.max_num_seqs, config)
        self.loop = HeadLoop(frontend=self.frontend, executor=executor,
                             scheduler_config=scheduler_config,
                             block_size=cache_config.block_size,
                             num_microbatches=config.num_microbatches,
                             hop_links=lambda: self.hop_stats(),
                             shared_cores=lambda: self._shared_cores(),
                             not_ready_reason=lambda: self.health()[1],
                             stall_factor=config.decode_stall_factor)
        self._here = (host_id(), cpu_cores(), cpu_set(), compute_threads())  # asked once
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
        self.peers = StagePeers(security, lambda stage_id: self.membership.get(stage_id) is not None)
        self.route = RouteWiring(config, security, self.peers)
        self.desk = JoinDesk(self.membership, self.peers,
                             lambda: planning_footprint(
                                 model_config.model, self.membership.identity.dtype,
                                 model_config.max_model_len, self.arch.max_position_embeddings,
                                 model_config.quantization),
                             settle_s=config.placement_settle_s,
                             headroom=config.placement_headroom,
                             head_expected=config.auto_layers,
                             on_dead=lambda member, why: self.watch.on_stage_failure(member, why))
        self._received = DuplicateFilter()
        self._tasks: set[asyncio.Task] = set()  # keeps background tasks alive until done
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task | None = None
        self.watch = StageWatch(self)  # health checks, failover, leaving stages
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

    # The engine loop owns these; the API, the metrics and the tests read them here.
    executor = _loop_attribute("executor")
    scheduler = _loop_attribute("scheduler")
    tokenizer = _loop_attribute("tokenizer")
    stats = _loop_attribute("stats")
    listeners = _loop_attribute("listeners")
    max_model_len = _loop_attribute("max_model_len")
    stage_compute_s = _loop_attribute("stage_compute_s")
    breakdown = _loop_attribute("breakdown", "Where steps' time went (StepBreakdown).")
    num_microbatches = _loop_attribute("num_microbatches")
    tuner = _loop_attribute("tuner", "The micro-batch count and prefill budget in force.")
    num_in_flight = _loop_attribute("num_in_flight", "Plans in the pipeline now.")

    @property
    def ready(self) -> bool:
        return self._ready

    def health(self) -> tuple[bool, str]:
        if self._ready:
            return True, "serving all layers"
        if failing_over := self.watch.describe():
            return False, failing_over
        if self.membership.complete:
            return False, f"setting up the route: {self.route_error or 'connecting the stages'}"
        return False, f"layers {self.membership.describe_missing()} are not served"

    def hop_stats(self) -> list[HopStats]:
        """Every hop in pipeline order (the last: results back to the head), as measured."""
        labels = self.stage_labels()
        if self.executor is None:
            labels = ["head", *labels]
        hops: list[LinkReport] = list(self.loop.hops)
        if self.route.first_hop is not None:
            own = self.route.first_hop.report()
            hops = [own, *hops[1:]] if hops else [own]
        return label_hops(labels, hops)

    def stage_labels(self) -> list[str]:
        """Every stage in pipeline order, the head's own layers first when it has some."""
        labels = []
        if self.membership.head_range is not None:
            a, b = self.membership.head_range
            labels.append(f"head layers {a}:{b}")
        return labels + [m.label for m in self.membership.ordered()]

    def stage_roles(self) -> list[tuple[str, str]]:
        """(label, role) of every stage: active ones in pipeline order ("active" or
        "draining"), then the standbys."""
        return [(m.label, m.role) for m in self.membership.all_members()]

    def describe(self) -> str:
        standbys = [m.label for m in self.membership.standbys.values()]
        return (" -> ".join(self.stage_labels())
                + f"; {self.num_microbatches} micro-batches in flight"
                + (f"; standby: {', '.join(standbys)}" if standbys else ""))

    def _shared_cores(self) -> int | None:
        """Cores of the one machine whose CPUs compute every stage, if that is the case (the
        stages then compete for its cores, a resource of its own for the chooser)."""
        members = self.membership.ordered()
        computes = [(m.host_id, m.device, m.cpu_cores, m.cpu_set, m.threads) for m in members
                    if m.device != "emulated"]
        if self.executor is not None:
            computes.append((self._here[0], self.executor.device.type, *self._here[1:]))
        return shared_cores(computes)

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
        self._health_task = asyncio.create_task(self.watch.run())
        if self.config.auto_layers:
            self.spawn(self._take_own_layers())
        if self.membership.complete:  # the head serves every layer itself
            await self._on_complete()
        return port

    def begin_stop(self) -> asyncio.Task:
        """From now on, stages going away is expected: no failure handling, no alarms (the
        first hop is closed, so it does not try to re-open a stream to a stopped stage)."""
        self._stopping = True
        return self.spawn(self.route.close_first_hop())  # done: the first hop is closed

    async def stop(self) -> None:
        """Stop; every stage is told to free its requests' state (it joins again when a
        head is back)."""
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
        await self.route.close_first_hop()
        await asyncio.gather(*(self._release(m) for m in self.membership.all_members()))
        await self.peers.close_all()
        if self._server is not None:
            await self._server.stop(grace=0.5)
        self.loop.shutdown()

    async def _take_own_layers(self) -> None:
        """``serve --layers auto``: load what the plan gives the head, then serve."""
        layers = await self._own.take(self.desk, self.loop, lambda: self._stopping)
        if layers is not None:
            self.membership.head_range = layers
            if self.membership.complete:
                await self._on_complete()

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every layer is served (TimeoutError naming the missing ones otherwise)."""
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"pipeline not ready after {timeout_s} s: "
                               f"{self.health()[1]}") from None

    @property
    def configuring(self) -> bool:
        """A route is being set up now."""
        return self._configuring

    @property
    def stopping(self) -> bool:
        return self._stopping

    def mark_unready(self) -> None:
        """The route broke: not ready, and whatever the old route still delivers is void
        (a new epoch)."""
        self._ready = False
        self._ready_event.clear()
        self._epoch += 1

    def set_up_route(self) -> None:
        """Wire the route now, in the background, unless that is under way."""
        if not self._configuring:
            self.spawn(self._on_complete())

    def spawn(self, coroutine) -> asyncio.Task:
        """Run a background task, holding a reference so it is not collected mid-flight."""
        self._tasks.add(task := asyncio.get_running_loop().create_task(coroutine))
        task.add_done_callback(self._tasks.discard)
        return task

    async def _release(self, member: StageMember) -> None:
        try:
            peer = await self.peers.get(member)
            await pb_grpc.StageStub(peer.channel).Release(
                pb.ReleaseRequest(head_instance=self.instance, reason="the head shut down"),
                metadata=peer.metadata, timeout=RELEASE_DEADLINE_S)
        except (grpc.aio.AioRpcError, PeerUnreachable) as exc:
            logger.info("could not tell %s to free its requests (%s); it will notice the head "
                        "is gone", member.label, error_detail(exc))

    # ---- RPCs from stages ---------------------------------------------------------------------

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        if self._stopping:  # a stage released at shutdown: it retries until a head is back
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the head is shutting down")
        info = request.stage
        address = info.address or stage_address(context.peer(), info.port)
        if info.auto_layers and info.end_layer == 0:
            return await self.desk.offer(info.node_id or address, info)
        min_blocks = self.scheduler.block_pool.num_blocks if self.scheduler else 1
        # A stage whose exact range is served already (by a standby promoted before it came),
        # or that was lost and is back while others serve its layers, waits as a standby
        # instead of being refused.
        served = [(m.start_layer, m.end_layer) for m in self.membership.ordered()
                  if m.overlaps(info.start_layer, info.end_layer)]
        standby = info.standby or bool(served) and (
            info.node_id in self.watch.lost_nodes
            or set(served) == {(info.start_layer, info.end_layer)})
        member, reason = await self.desk.join(info, address, min_blocks, standby=standby)
        if member is None:
            return pb.JoinReply(accepted=False, reason=reason)
        promoted = member.role == "standby" and member in self.membership.promote()
        missing = self.membership.describe_missing()
        logger.info("stage joined: %s, %s KV blocks%s%s", member.label, f"{info.num_blocks:,}",
                    " as a standby" + (" (active at once: its layers were not served)"
                                       if promoted else "") if standby else "",
                    f" (still missing layers {missing})" if missing else "")
        if self.membership.complete:
            self.spawn(self._on_complete())
        return pb.JoinReply(accepted=True, stage_id=member.stage_id, head_instance=self.instance,
                            address=address)

    async def Results(self, request_iterator, context):
        """Results from the last stage; taken, then acknowledged (an acknowledged result
        is never lost). Repeats after a re-opened stream are dropped; results of an older
        route are dropped by the loop."""
        def take(result) -> None:
            self.loop.on_result(result.output, result.error, result.stage_compute_s,
                                result.hops, epoch=result.epoch, waits=result.stage_wait_s)

        async for ack in take_each(request_iterator, context, decode_result, self._received,
                                   take, "result"):
            yield ack

    async def Health(self, request, context) -> pb.HealthReply:
        """For monitors, and for stages asking whether they are still members."""
        ready, detail = self.health()
        return pb.HealthReply(ready=ready, detail=detail, head_instance=self.instance,
                              member=self.membership.get(request.stage_id) is not None)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveReply:
        """A stage leaves on purpose; answered when it may exit (``StageWatch.leave``)."""
        return await self.watch.leave(request.stage_id, request.drain_timeout_s)

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
        source = self.stage_labels()[0] if self.executor is not None else "head"
        try:
            await self.route.wire(stages, epoch=epoch, source=source,
                                  head_address=self.advertised_address,
                                  on_lost=self.watch.on_stage_failure)
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            self.route_error = detail
            self.stats.num_route_failures += 1
            logger.error("could not set up the route %s: %s (retrying every %.0f s)",
                         " -> ".join(self.stage_labels()), detail, ROUTE_RETRY_S)
            await self.route.close_first_hop()
            return
        if epoch != self._epoch or not self.membership.complete:
            return  # the membership changed meanwhile: the next attempt wires the new one
        self.route_error = ""
        counts = [m.num_blocks for m in stages]
        if self.executor is not None:
            counts.append(self.executor.num_blocks)
        self._ready = True
        self.watch.route_ready()
        self.loop.open(epoch, self.route.first_hop, min(counts),
                       num_stages=len(stages) + (self.executor is not None))
        self._ready_event.set()
        for callback in self.ready_callbacks:
            callback()
        logger.info("pipeline ready: %s", self.describe())
