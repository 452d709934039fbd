"""HeadLoop: the head's engine loop, with no sockets (the node around it has those).

It keeps up to ``num_microbatches`` plans in flight::

    schedule() ──> [head layers] ──> first hop ──> ... stages ... ──> on_result()
        ^                                                                │
        └────────── update_from_output, detokenize, deliver <────────────┘

A request is never in two in-flight plans (the scheduler guarantees it; ``_dispatch`` checks
it). Results may come back in any order. The node (``PipelineHead``) opens the loop when a route
is set up (``open``), feeds it results (``on_result``), and asks it, every second, for a step
that is overdue (``overdue_step``). When the pipeline breaks it either suspends the loop
(``suspend``: failover; every request is kept, its stream open, and replayed when the next route
opens) or closes it (``close``: every request fails with the reason). Route epochs tie both
together: a step planned under one route is never matched to a result of another.

Replay: a request's state is its prompt and the tokens it generated; the next route
re-prefills both (chunked like any prefill) and generation goes on with the same tokens,
greedy or seeded (the sampler draws from the request's seed and position).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable

from molink.config import SchedulerConfig
from molink.coordinator.frontend import Frontend
from molink.coordinator.head_stats import HeadStats, Replays
from molink.coordinator.microbatch_tuner import MicrobatchTuner
from molink.coordinator.output_processor import OutputProcessor
from molink.coordinator.step_breakdown import StepBreakdown, StepTimes
from molink.coordinator.step_deadlines import overdue_step, step_deadline_s
from molink.messages import LinkReport, StepOutput, StepPlan
from molink.outputs import RequestOutput
from molink.runtime.intra_op import serial_here
from molink.sampling_params import SamplingParams
from molink.scheduler import Scheduler
from molink.stage.compute import StageCompute
from molink.transport.outgoing import OutgoingStep

logger = logging.getLogger(__name__)

MAX_REPLAYS = 3  # a request replayed this often fails on the next loss (it may be the cause)


class PipelineNotReady(Exception):
    """Some layers are not served (or the route is being set up); the message says which."""


class StageUnavailable(Exception):
    """A stage died or became unreachable while a request was in the pipeline."""


class HeadLoop:
    def __init__(self, *, frontend: Frontend, executor,
                 scheduler_config: SchedulerConfig, block_size: int,
                 num_microbatches: int | None,
                 hop_links: Callable[[], list],
                 shared_cores: Callable[[], int | None],
                 not_ready_reason: Callable[[], str], stall_factor: float = 0.0) -> None:
        """``hop_links``: every hop's latest measurement, pipeline order; ``shared_cores``:
        cores of the one machine computing every stage, if so; ``not_ready_reason``: why
        requests are refused while the loop is closed. All three come from the node.
        ``stall_factor``: ``scheduler.stall_bound``'s (0: prefill not bounded by decodes)."""
        self.frontend = frontend  # tokenizer, EOS ids, model length, request building
        self.tokenizer = frontend.tokenizer
        self.executor = self.compute = None  # the head's own layers, if any
        if executor is not None:
            self.attach_executor(executor)
        self.scheduler_config = scheduler_config
        self.block_size = block_size
        self.num_microbatches_option = num_microbatches
        self.stall_factor = stall_factor if scheduler_config.enable_chunked_prefill else 0.0
        self._hop_links = hop_links
        self._shared_cores = shared_cores
        self._not_ready_reason = not_ready_reason
        self.stats = HeadStats()
        self.scheduler: Scheduler | None = None
        self.output_processor = OutputProcessor(frontend.tokenizer)
        self.hops: tuple[LinkReport, ...] = ()  # latest measurements, pipeline order
        self.tuner = MicrobatchTuner()  # auto: the measured choice
        self.breakdown = StepBreakdown()  # where each step's time went (/metrics)
        # Observers (metrics): on_request_added(request_id), on_output(RequestOutput),
        # on_request_failed(request_id), on_request_aborted(request_id). Called on the event
        # loop; must be cheap.
        self.listeners: list = []
        self.num_stages = 1  # compute stages in the route (the default micro-batch count)
        self.first_hop = None  # the HopSender to the first stage, while open
        self.epoch = 0  # the route's epoch, while open
        self.is_open = False
        self.suspended_since: float | None = None  # failing over: requests wait for a route
        self._streams: dict[str, asyncio.Queue] = {}
        self._in_flight: dict[int, StepPlan] = {}  # step id -> plan, oldest first
        self._in_flight_requests: set[str] = set()
        self._dispatched_at: dict[int, float] = {}  # step id -> when it left
        self._reset_pending = False
        self.replays = Replays(self.stats)
        self._compute_pool = concurrent.futures.ThreadPoolExecutor(1, "molink-head-compute")
        # Large outputs are serialized on a thread of their own (one core: runtime/intra_op.py)
        # so the next step's compute need not wait for them; small ones by the compute thread.
        self._serialize_pool = concurrent.futures.ThreadPoolExecutor(
            1, "molink-head-serialize", initializer=serial_here)
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()  # keeps background tasks alive until done

    # ---- opening and closing ------------------------------------------------------------------

    def attach_executor(self, executor) -> None:
        """The head's own layers (loaded later under automatic placement, while closed)."""
        executor.eos_token_ids = self.frontend.eos_token_ids
        self.executor, self.compute = executor, StageCompute(executor)

    def open(self, epoch: int, first_hop, num_blocks: int, num_stages: int) -> None:
        """A route is set up (``first_hop``: None when the head computes every layer):
        size the scheduler on first use, start serving."""
        self.epoch, self.first_hop, self.num_stages = epoch, first_hop, num_stages
        if self.scheduler is None:
            max_model_len = self.frontend.fit_kv_capacity(num_blocks * self.block_size)
            config = dataclasses.replace(self.scheduler_config, max_model_len=max_model_len)
            self.scheduler = Scheduler(config, num_blocks, self.block_size)
        self.is_open = True
        self.suspended_since = None
        self.scheduler.admitting = True
        self._pump()

    def suspend(self, message: str) -> None:
        """The pipeline broke; a replacement is expected: keep every request and its stream,
        forget the steps in flight, and requeue the requests to be replayed (prompt + the
        tokens generated so far) on the next route. New requests queue meanwhile. A request
        replayed MAX_REPLAYS times already fails with ``message`` instead."""
        if self.scheduler is None or not self.is_open and self.suspended_since is None:
            self.close(message)  # never opened, or already closed: nothing to keep
            return
        if self.suspended_since is None:
            self.stats.num_failovers += 1
            self.suspended_since = time.monotonic()
        self._forget_route()
        for request in self.scheduler.requeue_all():
            if request.num_replays > MAX_REPLAYS:
                self._fail_requests([request.request_id], StageUnavailable(
                    f"{message} (the request was replayed {MAX_REPLAYS} times already)"))
            else:
                self.replays.lost(request.request_id)

    def close(self, message: str) -> None:
        """The pipeline broke: fail every request in it with ``message`` (each may have lost
        KV somewhere) and start the next route from a clean state on every node."""
        self._fail_requests(list(self._streams), StageUnavailable(message))
        self._forget_route()
        self.suspended_since = None
        if self.scheduler is not None:
            self.scheduler = Scheduler(self.scheduler.config, self.scheduler.block_pool.num_blocks,
                                       self.scheduler.block_size)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.replays.clear()

    def _forget_route(self) -> None:
        """Steps in flight and measurements of the route that broke are void; every node
        drops its request state before the next route's first step."""
        self.is_open = False
        self.first_hop = None
        self._in_flight.clear()
        self._dispatched_at.clear()
        self._in_flight_requests.clear()
        self.hops = ()
        self.tuner.reset()
        self.breakdown.reset()
        self._reset_pending = True  # surviving stages drop their request state
        if self.executor is not None:
            self._compute_pool.submit(self.executor.reset)

    def drain(self, draining: bool) -> None:
        """While a stage drains before it leaves, waiting requests are not started."""
        if self.scheduler is not None:
            self.scheduler.admitting = not draining

    @property
    def accepting(self) -> bool:
        """Whether new requests are taken (open, or failing over: they wait for the route)."""
        return self.is_open or self.suspended_since is not None

    def shutdown(self) -> None:
        self._compute_pool.shutdown(wait=False, cancel_futures=True)
        self._serialize_pool.shutdown(wait=False, cancel_futures=True)

    # ---- requests -----------------------------------------------------------------------------

    async def generate(self, prompt, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; raises PipelineNotReady / StageUnavailable /
        ValueError. The request is queued before the first await."""
        if not self.accepting:
            raise PipelineNotReady(f"pipeline not ready: {self._not_ready_reason()}")
        request_id = request_id or f"req-{next(self._ids)}"
        text, request = self.frontend.make_request(request_id, prompt, params)
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
        self.replays.forget(request_id)
        for _ in aborted:
            for listener in self.listeners:
                listener.on_request_aborted(request_id)

    @property
    def max_model_len(self) -> int:
        """Tokens a request may hold (0 until the first route sizes the KV cache)."""
        return self.frontend.max_model_len

    @property
    def stage_compute_s(self) -> list[float]:
        """Each stage's compute seconds per step (EWMA), pipeline order."""
        return self.tuner.stage_compute_s

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def num_microbatches(self) -> int:
        """How many plans may be in flight: as configured, or (auto) the measured choice;
        stages + 1 until there are measurements."""
        if self.num_microbatches_option:
            return self.num_microbatches_option
        if self.tuner.choice is not None:
            return self.tuner.choice
        return self.num_stages + 1

    # ---- the loop -------------------------------------------------------------------------------

    def _spawn(self, coroutine) -> None:
        """Run a background task, holding a reference so it is not collected mid-flight."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pump(self) -> None:
        """Fill the pipeline up to ``num_microbatches`` plans."""
        while self.is_open and len(self._in_flight) < self.num_microbatches:
            # Spread the requests evenly over the micro-batches, so every stage gets an
            # equal share of work in each round instead of one big and several tiny batches.
            share = -(-self.scheduler.num_unfinished // self.num_microbatches)
            budget = self.tuner.prefill_budget(self.stall_factor, self.scheduler.num_decoding,
                                               self.num_microbatches,
                                               self.scheduler_config.max_num_batched_tokens)
            plan = self.scheduler.schedule(max_num_requests=max(1, share), prefill_budget=budget)
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
        self._dispatched_at[plan.step_id] = time.monotonic()
        reset, self._reset_pending = self._reset_pending, False
        computing = None
        if self.executor is not None:  # queued for the compute thread now, not when a task runs
            computing = asyncio.get_running_loop().run_in_executor(self._compute_pool,
                                                                   self._compute_own, plan)
        self._spawn(self._run_first_hop(plan, reset, self.epoch, computing))

    async def _run_first_hop(self, plan: StepPlan, reset: bool, epoch: int,
                             computing: asyncio.Future | None) -> None:
        """The head's own layers (if any: ``computing``), then the step leaves on the first
        hop. A step whose route changed meanwhile is void (the close already failed its
        requests)."""
        activations, timings, waits, computed_at, encoded = None, (), (), 0.0, None
        loop = asyncio.get_running_loop()
        if computing is not None:
            dispatched_at = self._dispatched_at.get(plan.step_id, time.monotonic())
            try:
                out, seconds, began, computed_at, encoded = await computing
            except Exception as exc:  # the head's own layers failed this step
                logger.exception("head layers failed step %d", plan.step_id)
                self.on_result(StepOutput(plan.step_id), f"head failed step {plan.step_id}: {exc}",
                               epoch=epoch)
                return
            timings, waits = (seconds,), (max(0.0, began - dispatched_at),)
            if isinstance(out, StepOutput):  # the head serves every layer
                self.on_result(out, "", timings, epoch=epoch, waits=waits)
                return
        if epoch != self.epoch or self.first_hop is None:
            return
        if self.executor is not None:
            activations = encoded or await loop.run_in_executor(
                self._serialize_pool, self.compute.encode, out, self.first_hop)
            self.stats.activation_bytes_sent += len(activations.data) + len(activations.row_scales)
            self.stats.activation_tokens_sent += plan.num_tokens
        if epoch != self.epoch or self.first_hop is None:
            return
        self.first_hop.submit(OutgoingStep(plan, activations, plan.num_tokens, reset=reset,
                                           stage_compute_s=timings, epoch=epoch,
                                           stage_wait_s=waits, computed_at=computed_at))

    def _compute_own(self, plan: StepPlan):
        """On the compute thread: (output, seconds, began, ended, a small output encoded)."""
        began = time.monotonic()
        output, seconds = self.compute.run(plan)
        return (output, seconds, began, time.monotonic(),
                self.compute.encode_small(output, self.first_hop))

    def on_result(self, output: StepOutput, error: str, timings: tuple[float, ...] = (),
                  hops: tuple[LinkReport, ...] = (), *, epoch: int,
                  waits: tuple[float, ...] = ()) -> None:
        """A step's result (or its error) from the last stage, in any order."""
        if epoch != self.epoch or not self.is_open:
            return  # of an older route, whose requests were failed when it closed
        arrived_at = time.monotonic()
        plan = self._in_flight.pop(output.step_id, None)
        if plan is None:
            logger.warning("ignoring result of step %d (not in flight)", output.step_id)
            return
        dispatched_at = self._dispatched_at.pop(output.step_id, arrived_at)
        if self._in_flight and next(iter(self._in_flight)) < plan.step_id:
            self.stats.num_results_out_of_order += 1
        self.tuner.record(plan, timings)
        if hops:
            self.hops = hops
        self._in_flight_requests -= set(plan.request_ids)
        self.stats.num_steps_completed += 1
        if error:
            self._fail_requests(plan.request_ids, StageUnavailable(error))
            output = StepOutput(plan.step_id, microbatch_id=plan.microbatch_id)
            output.sampled_token_ids = {e.request_id: 0 for e in plan.batch if e.sample}
        changed = self.scheduler.update_from_output(plan, output)
        self.replays.delivered(changed)
        for result in self.output_processor.process(changed, output, self.scheduler):
            stream = self._streams.get(result.request_id)
            if stream is not None:
                stream.put_nowait(result)
            for listener in self.listeners:
                listener.on_output(result)
        if not self.num_microbatches_option:
            unfinished, decoding = self.scheduler.num_unfinished, self.scheduler.num_decoding
            self.tuner.update(self._hop_links(), min(unfinished, self.scheduler_config.max_num_seqs),
                              self._shared_cores(), tokens=len(changed), decoding=decoding,
                              prefilling=unfinished - decoding)
        self._pump()
        if not error:
            self.breakdown.record(plan, StepTimes(arrived_at - dispatched_at, waits, timings,
                                                  tuple(h.send_wait_s for h in hops),
                                                  time.monotonic() - arrived_at))

    def _fail_requests(self, request_ids, exc: Exception) -> None:
        for request_id in list(request_ids):
            self.replays.forget(request_id)
            stream = self._streams.pop(request_id, None)
            if self.scheduler is not None:
                self.scheduler.abort_requests([request_id])
            self.output_processor.discard(request_id)
            if stream is not None:
                stream.put_nowait(exc)
            for listener in self.listeners:
                listener.on_request_failed(request_id)

    # ---- deadlines ------------------------------------------------------------------------------

    def step_deadline_s(self, num_tokens: int) -> float:
        """How long a step of ``num_tokens`` may take before it counts as lost."""
        return step_deadline_s(self.tuner.predict_step_s(num_tokens), self._hop_links(),
                               self._in_flight.values())

    def overdue_step(self) -> str:
        """Describes the oldest step past its deadline ("" when none is)."""
        return overdue_step(self._in_flight, self._dispatched_at, self.step_deadline_s)
