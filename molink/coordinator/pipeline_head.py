"""PipelineHead: the head of a multi-node pipeline (``molink serve``).

It owns the tokenizer, the scheduler and (optionally) the first layer range; joined stages
serve the rest. The loop keeps up to ``num_microbatches`` plans in flight::

    schedule() ──> [head layers] ──> stage 1 ──> ... ──> last stage ──> Results stream
        ^                                                                   │
        └──────────── update_from_output, detokenize, deliver <─────────────┘

A request is never in two in-flight plans (the scheduler guarantees it; ``_dispatch``
checks it). A stage that stops answering health checks, or whose stream breaks, fails the
requests in the pipeline with ``StageUnavailable`` naming it; the head stays up, reports
the missing range, and a replacement that joins for that range restores service.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator

import grpc

from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.membership import Membership, ModelIdentity, StageMember
from molink.coordinator.microbatch_tuner import MicrobatchTuner
from molink.coordinator.output_processor import OutputProcessor
from molink.coordinator.prompts import make_request
from molink.coordinator.tokenizer import eos_token_ids, load_tokenizer
from molink.messages import LinkReport, StepOutput, StepPlan
from molink.model.loader import config_fingerprint, load_config, resolve_dtype
from molink.outputs import RequestOutput
from molink.runtime.host import cpu_cores, host_id
from molink.runtime.stage_executor import StageExecutor, resolve_device
from molink.runtime.wire_tensor import to_raw
from molink.sampling_params import SamplingParams
from molink.scheduler import Scheduler
from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.codec import WireFormatError, decode_result
from molink.transport.hop_sender import COMPRESSIONS, SCHEDULES, HopSender, OutgoingStep
from molink.transport.peers import Peer, bind, make_server

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
HEALTH_DEADLINE_S = 2.0
HEALTH_FAILURES_BEFORE_DOWN = 2
CONFIGURE_DEADLINE_S = 5.0
_EWMA_WEIGHT = 0.2


class PipelineNotReady(Exception):
    """Some layers are not served; the message names them."""


class StageUnavailable(Exception):
    """A stage died or became unreachable while a request was in the pipeline."""


@dataclasses.dataclass
class HeadStats:
    num_steps_dispatched: int = 0
    num_steps_completed: int = 0
    max_microbatches_in_flight: int = 0
    num_requests_in_two_microbatches: int = 0  # must stay 0
    num_stage_failures: int = 0
    activation_bytes_sent: int = 0  # on the head's outgoing hop
    activation_tokens_sent: int = 0
    num_results_out_of_order: int = 0  # a later micro-batch finished first


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
                 scheduler_config: SchedulerConfig, *, token: str,
                 head_layers: tuple[int, int] | None, num_microbatches: int | None = None,
                 link_schedule: str = "molink", compression: str = "auto",
                 max_chunk_tokens: int | None = None) -> None:
        if link_schedule not in SCHEDULES:
            raise ValueError(f"link schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {link_schedule!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, "
                             f"got {compression!r}")
        if num_microbatches is not None and num_microbatches < 1:
            raise ValueError(f"num_microbatches must be at least 1, got {num_microbatches}")
        if max_chunk_tokens is not None and max_chunk_tokens < 1:
            raise ValueError(f"max_chunk_tokens must be at least 1, got {max_chunk_tokens}")
        self.link_schedule = link_schedule
        self.compression = compression
        self.max_chunk_tokens = max_chunk_tokens
        loaded = load_config(model_config.model)
        self.arch = loaded.arch
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.token = token
        self.executor = None
        if head_layers is not None:
            self.executor = StageExecutor(
                model_config.replace(start_layer=head_layers[0], end_layer=head_layers[1]),
                cache_config, max_num_seqs=scheduler_config.max_num_seqs)
        dtype = resolve_dtype(model_config.dtype, self.arch, resolve_device(model_config.device))
        self.membership = Membership(
            ModelIdentity(config_fingerprint(model_config.model), str(dtype).removeprefix("torch."),
                          cache_config.block_size, self.arch.num_layers), head_layers)
        self.tokenizer = load_tokenizer(model_config.tokenizer or model_config.model)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.arch.eos_token_ids,
                                           model_config.model)
        if self.executor is not None:
            self.executor.eos_token_ids = self.eos_token_ids
        self.num_microbatches_option = num_microbatches
        self.stats = HeadStats()
        self.stage_compute_s: list[float] = []  # EWMA per stage, pipeline order
        self._hops: tuple[LinkReport, ...] = ()  # latest measurements, pipeline order
        self._tuner = MicrobatchTuner()  # auto: the measured choice
        self.scheduler: Scheduler | None = None
        self.output_processor = OutputProcessor(self.tokenizer)
        self._streams: dict[str, asyncio.Queue] = {}
        # Observers (metrics): on_request_added(request_id), on_output(RequestOutput),
        # on_request_failed(request_id), on_request_aborted(request_id). Called on the event
        # loop; must be cheap.
        self.listeners: list = []
        self.ready_callbacks: list = []  # called each time the pipeline becomes ready
        self._in_flight: dict[int, StepPlan] = {}  # step id -> plan, oldest first
        self._in_flight_requests: set[str] = set()
        self._ready = False
        self._stopping = False
        self._ready_event: asyncio.Event | None = None
        self._epoch = 0
        self._reset_pending = False
        self._first_hop: HopSender | None = None
        self._compute_pool = concurrent.futures.ThreadPoolExecutor(1, "molink-head-compute")
        # Serialization on its own thread, so the next step's compute need not wait for it.
        self._serialize_pool = concurrent.futures.ThreadPoolExecutor(1, "molink-head-serialize")
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()  # keeps background tasks alive until done
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task | None = None
        self.address = ""
        self.max_model_len = 0

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str, peer_port: int, advertise_host: str | None = None) -> int:
        self._ready_event = asyncio.Event()
        self._server = make_server(self.token)
        pb_grpc.add_HeadServicer_to_server(self, self._server)
        port = bind(self._server, host, peer_port)
        await self._server.start()
        self.address = f"{advertise_host or host}:{port}"
        self._health_task = asyncio.create_task(self._health_loop())
        if self.membership.complete:  # the head serves every layer itself
            await self._on_complete()
        return port

    def begin_stop(self) -> None:
        """From now on, stages going away is expected: no failure handling, no alarms."""
        self._stopping = True

    async def stop(self) -> None:
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
        await self._close_first_hop()
        if self._server is not None:
            await self._server.stop(grace=0.5)
        self._compute_pool.shutdown(wait=False, cancel_futures=True)
        self._serialize_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self._ready

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every layer is served (TimeoutError naming the missing ones otherwise)."""
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"pipeline not ready after {timeout_s} s: {self.health()[1]}") from None

    def health(self) -> tuple[bool, str]:
        if self._ready:
            return True, "serving all layers"
        return False, f"layers {self.membership.describe_missing()} are not served"

    @property
    def num_microbatches(self) -> int:
        """How many plans may be in flight: as configured, or (auto) the measured choice;
        stages + 1 until there are measurements."""
        if self.num_microbatches_option:
            return self.num_microbatches_option
        if self._tuner.choice is not None:
            return self._tuner.choice
        num_stages = len(self.membership.stages) + (self.executor is not None)
        return num_stages + 1

    def hop_stats(self) -> list[HopStats]:
        """Every hop in pipeline order (the last: results back to the head), as measured."""
        labels = self.stage_labels()
        if self.executor is None:
            labels = ["head", *labels]
        hops = list(self._hops)
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

    # ---- requests ------------------------------------------------------------------------------

    async def generate(self, prompt, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; raises PipelineNotReady / StageUnavailable / ValueError."""
        if not self._ready:
            raise PipelineNotReady(f"pipeline not ready: {self.health()[1]}")
        request_id = request_id or f"req-{next(self._ids)}"
        text, request = make_request(request_id, prompt, params, tokenizer=self.tokenizer,
                                     vocab_size=self.arch.vocab_size,
                                     max_model_len=self.max_model_len,
                                     eos_token_ids=self.eos_token_ids)
        stream: asyncio.Queue = asyncio.Queue()
        self.scheduler.add_request(request)
        self.output_processor.add(request, text)
        self._streams[request_id] = stream
        for listener in self.listeners:
            listener.on_request_added(request_id)
        self._pump()
        try:
            while True:
                item = await stream.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if self._streams.pop(request_id, None) is not None:  # consumer left early
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        aborted = []
        if self.scheduler is not None:
            aborted = self.scheduler.abort_requests([request_id])
            for request in aborted:
                self.output_processor.discard(request.request_id)
        self._streams.pop(request_id, None)
        for _ in aborted:
            for listener in self.listeners:
                listener.on_request_aborted(request_id)

    # ---- the loop ----------------------------------------------------------------------------------

    def _spawn(self, coroutine) -> None:
        """Run a background task, holding a reference so it is not collected mid-flight."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pump(self) -> None:
        """Fill the pipeline up to ``num_microbatches`` plans."""
        while self._ready and len(self._in_flight) < self.num_microbatches:
            # Spread the requests evenly over the micro-batches, so every stage gets an
            # equal share of work in each round instead of one big and several tiny batches.
            share = -(-self.scheduler.num_unfinished // self.num_microbatches)
            plan = self.scheduler.schedule(max_num_requests=max(1, share))
            if plan is None:
                return
            self._dispatch(plan)

    def _dispatch(self, plan: StepPlan) -> None:
        plan.microbatch_id = self.stats.num_steps_dispatched % self.num_microbatches
        ids = set(plan.request_ids)
        if ids & self._in_flight_requests:
            self.stats.num_requests_in_two_microbatches += len(ids & self._in_flight_requests)
        self._in_flight_requests |= ids
        self._in_flight[plan.step_id] = plan
        self.stats.num_steps_dispatched += 1
        self.stats.max_microbatches_in_flight = max(self.stats.max_microbatches_in_flight,
                                                    len(self._in_flight))
        reset, self._reset_pending = self._reset_pending, False
        self._spawn(self._run_first_hop(plan, reset))

    async def _run_first_hop(self, plan: StepPlan, reset: bool) -> None:
        rows, timings = None, ()
        if self.executor is not None:
            loop = asyncio.get_running_loop()
            try:
                start = time.perf_counter()
                out = await loop.run_in_executor(self._compute_pool, self.executor.execute, plan)
                timings = (time.perf_counter() - start,)
            except Exception as exc:  # the head's own layers failed this step
                logger.exception("head layers failed step %d", plan.step_id)
                self._on_result(StepOutput(plan.step_id), f"head failed step {plan.step_id}: {exc}")
                return
            if isinstance(out, StepOutput):  # the head serves every layer
                self._on_result(out, "", timings)
                return
        if self._first_hop is None:
            self._on_result(StepOutput(plan.step_id), "no route to the first stage")
            return
        if self.executor is not None:
            compression = self._first_hop.wire_compression(
                str(out.dtype).removeprefix("torch."), out.shape[-1],
                timings[0] / max(1, plan.num_tokens))
            rows = await loop.run_in_executor(self._serialize_pool, to_raw, out, compression)
            self.stats.activation_bytes_sent += len(rows.data) + len(rows.row_scales)
            self.stats.activation_tokens_sent += plan.num_tokens
        self._first_hop.submit(OutgoingStep(plan, rows, plan.num_tokens, reset=reset,
                                            stage_compute_s=timings))

    def _on_result(self, output: StepOutput, error: str, timings: tuple[float, ...] = (),
                   hops: tuple[LinkReport, ...] = ()) -> None:
        plan = self._in_flight.pop(output.step_id, None)
        if plan is None:
            logger.warning("ignoring result of step %d (not in flight)", output.step_id)
            return
        if self._in_flight and next(iter(self._in_flight)) < plan.step_id:
            self.stats.num_results_out_of_order += 1
        self._record_timings(plan, timings)
        if hops:
            self._hops = hops
        self._in_flight_requests -= set(plan.request_ids)
        self.stats.num_steps_completed += 1
        if error:
            self._fail_requests(plan.request_ids, StageUnavailable(error))
            output = StepOutput(plan.step_id, microbatch_id=plan.microbatch_id)
            output.sampled_token_ids = {e.request_id: 0 for e in plan.batch if e.sample}
        changed = self.scheduler.update_from_output(plan, output)
        for result in self.output_processor.process(changed, output, self.scheduler):
            stream = self._streams.get(result.request_id)
            if stream is not None:
                stream.put_nowait(result)
            for listener in self.listeners:
                listener.on_output(result)
        if not self.num_microbatches_option:
            self._tuner.update(self.hop_stats(), min(self.scheduler.num_unfinished,
                                                     self.scheduler_config.max_num_seqs),
                               self._shared_cores())
        self._pump()

    def _record_timings(self, plan: StepPlan, timings: tuple[float, ...]) -> None:
        """Per-stage compute seconds per step: smoothed (EWMA) for display, and fitted
        against the step's tokens for the micro-batch chooser."""
        if len(timings) != len(self.stage_compute_s):
            self.stage_compute_s = list(timings)
        else:
            for i, seconds in enumerate(timings):
                self.stage_compute_s[i] += _EWMA_WEIGHT * (seconds - self.stage_compute_s[i])
        self._tuner.record(plan.num_tokens, timings)

    def _fail_requests(self, request_ids, exc: Exception) -> None:
        for request_id in list(request_ids):
            stream = self._streams.pop(request_id, None)
            if self.scheduler is not None:
                self.scheduler.abort_requests([request_id])
            self.output_processor.discard(request_id)
            if stream is not None:
                stream.put_nowait(exc)
            for listener in self.listeners:
                listener.on_request_failed(request_id)

    # ---- RPCs from stages ----------------------------------------------------------------------------

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        info = request.stage
        min_blocks = self.scheduler.block_pool.num_blocks if self.scheduler else 1
        reason = self.membership.check_join(info.start_layer, info.end_layer, info.address,
                                            info.model_fingerprint, info.dtype, info.block_size,
                                            info.num_layers)
        if reason is None and info.num_blocks < min_blocks:
            reason = (f"the stage holds {info.num_blocks} KV blocks; the running pipeline "
                      f"uses {min_blocks}")
        if reason is not None:
            logger.warning("refused stage %s (layers %d:%d): %s", info.address, info.start_layer,
                           info.end_layer, reason)
            return pb.JoinReply(accepted=False, reason=reason)
        member = self.membership.add(info.start_layer, info.end_layer, info.address,
                                     info.num_blocks)
        member.host_id, member.device, member.cpu_cores = info.host_id, info.device, info.cpu_cores
        missing = self.membership.describe_missing()
        logger.info("stage joined: %s, %s KV blocks%s", member.label, f"{info.num_blocks:,}",
                       f" (still missing layers {missing})" if missing else "")
        if self.membership.complete:
            self._spawn(self._on_complete())
        return pb.JoinReply(accepted=True, stage_id=member.stage_id)

    async def Results(self, request_iterator, context):
        try:
            async for message in request_iterator:
                yield pb.Ack()  # first: the sender's clock measures the link, not our work
                if message.probe:
                    continue
                try:
                    result = decode_result(message)
                except WireFormatError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"malformed result: {exc}")
                self._on_result(result.output, result.error, result.stage_compute_s,
                                result.hops)
        except asyncio.CancelledError:  # the server is stopping: end the stream quietly
            return

    async def Health(self, request, context) -> pb.HealthReply:
        ready, detail = self.health()
        return pb.HealthReply(ready=ready, detail=detail)

    # ---- membership changes ------------------------------------------------------------------------------

    async def _on_complete(self) -> None:
        """Every layer is served: wire the route, size the scheduler, start serving."""
        self._epoch += 1
        stages = self.membership.ordered()
        try:
            for i, member in enumerate(stages):
                next_address = stages[i + 1].address if i + 1 < len(stages) else ""
                await self._configure(member, next_address)
        except grpc.aio.AioRpcError as exc:
            logger.error("could not configure the pipeline: %s", exc.details())
            return
        await self._open_first_hop(stages[0] if stages else None)
        if self.scheduler is None:
            self._make_scheduler(stages)
        self._ready = True
        self._ready_event.set()
        for callback in self.ready_callbacks:
            callback()
        logger.info("pipeline ready: %s", self.describe())
        self._pump()

    async def _configure(self, member: StageMember, next_address: str) -> None:
        peer = Peer(member.address, self.token)
        try:
            await pb_grpc.StageStub(peer.channel).Configure(
                pb.Route(next_address=next_address, head_address=self.address, epoch=self._epoch,
                         link_schedule=self.link_schedule, compression=self.compression,
                         max_chunk_tokens=self.max_chunk_tokens or 0),
                metadata=peer.metadata, timeout=CONFIGURE_DEADLINE_S)
        finally:
            await peer.close()

    def _make_scheduler(self, stages: list[StageMember]) -> None:
        counts = [m.num_blocks for m in stages]
        if self.executor is not None:
            counts.append(self.executor.num_blocks)
        num_blocks = min(counts)
        capacity = num_blocks * self.cache_config.block_size
        limit = self.model_config.max_model_len or self.arch.max_position_embeddings
        self.max_model_len = max(2, min(limit, capacity))
        config = dataclasses.replace(self.scheduler_config, max_model_len=self.max_model_len)
        self.scheduler = Scheduler(config, num_blocks, self.cache_config.block_size)

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

    async def _open_first_hop(self, first: StageMember | None) -> None:
        await self._close_first_hop()
        if first is None:
            return
        source = self.stage_labels()[0] if self.executor is not None else "head"
        label = f"{source} -> {first.label}"
        sender = HopSender(first.address, self.token, to_head=False, schedule=self.link_schedule,
                           compression=self.compression,
                           max_chunk_tokens=self.max_chunk_tokens, label=label)
        sender.start()
        sender.broken.add_done_callback(
            lambda f: self._on_stage_failure(first, f"stream broke: {f.result()}"))
        self._first_hop = sender

    async def _close_first_hop(self) -> None:
        if self._first_hop is not None:
            sender, self._first_hop = self._first_hop, None
            await sender.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            for member in list(self.membership.stages.values()):
                await self._check_health(member)

    async def _check_health(self, member: StageMember) -> None:
        peer = Peer(member.address, self.token)
        try:
            await pb_grpc.StageStub(peer.channel).Health(pb.HealthRequest(), metadata=peer.metadata,
                                                         timeout=HEALTH_DEADLINE_S)
            member.consecutive_health_failures = 0
        except grpc.aio.AioRpcError as exc:
            member.consecutive_health_failures += 1
            if member.consecutive_health_failures >= HEALTH_FAILURES_BEFORE_DOWN:
                self._on_stage_failure(member, f"no answer to health checks ({exc.code().name})")
        finally:
            await peer.close()

    def _on_stage_failure(self, member: StageMember, why: str) -> None:
        if self._stopping or self.membership.remove(member.stage_id) is None:
            return  # already handled
        self.stats.num_stage_failures += 1
        self._ready = False
        self._ready_event.clear()
        message = f"stage {member.label} became unavailable: {why}"
        logger.error("%s; layers %s are no longer served", message, self.membership.describe_missing())
        # Every request in the pipeline lost KV on that stage: fail them all, clearly.
        doomed = [r for r in list(self._streams)]
        self._fail_requests(doomed, StageUnavailable(message))
        self._in_flight.clear()
        self._in_flight_requests.clear()
        self._hops = ()
        self._tuner.reset()
        self.scheduler = Scheduler(self.scheduler.config, self.scheduler.block_pool.num_blocks,
                                   self.scheduler.block_size) if self.scheduler else None
        self.output_processor = OutputProcessor(self.tokenizer)
        self._reset_pending = True  # surviving stages drop their request state
        self.stage_compute_s = []
        if self.executor is not None:
            self._compute_pool.submit(self.executor.reset)
        self._spawn(self._close_first_hop())
