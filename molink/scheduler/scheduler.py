"""Scheduler: decides which requests run in each step and which KV blocks they use.

The head's engine drives it with four calls::

    add_request / abort_requests / finish_request   (any time)
    plan = schedule()                                (a step may start)
    updated = update_from_output(plan, output)       (that step's tokens came back)

Several plans may be in flight at once (pipeline parallelism), each request in at most one;
``schedule()`` advances ``num_computed_tokens`` as soon as a request is planned, and
``update_from_output`` (any plan in flight, in any order) appends the sampled token.

Each step first continues running requests (decodes and unfinished prefill chunks, in
arrival order; prompt tokens within the stall bound while requests decode), then admits
waiting ones first-come-first-served. When a running request needs a block and none is
free, the most recently arrived running request that is not in flight is preempted: its
blocks are freed and it is later recomputed from scratch.
"""

from __future__ import annotations

import bisect
import collections
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from molink.config import SchedulerConfig
from molink.messages import BatchEntry, StepOutput, StepPlan
from molink.scheduler.block_pool import BlockPool
from molink.scheduler.request import (
    FINISH_REASON_TO_STATUS,
    Request,
    RequestStatus,
    cached_request_message,
    check_new_request,
    new_request_message,
    stop_condition,
)

logger = logging.getLogger(__name__)


@dataclass
class _InFlightPlan:
    step_id: int
    requests: list[Request]  # same order as plan.batch


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_blocks: int, block_size: int) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.config = config
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        # A request stops growing at the model's limit or at what the whole KV cache holds,
        # whichever is smaller; beyond that it could only preempt itself forever.
        self.max_len = min(config.max_model_len, num_blocks * block_size)

        # Every request the scheduler still owns state for: unfinished ones, plus finished
        # ones whose blocks are still used by an in-flight plan.
        self._requests: dict[str, Request] = {}
        self._waiting: collections.deque[Request] = collections.deque()  # FCFS; preempted first
        self._running: list[Request] = []  # hold KV blocks; sorted by arrival
        self._in_flight: collections.deque[_InFlightPlan] = collections.deque()
        self._freed_request_ids: list[str] = []  # for the next plan
        self._next_step_id = 0
        self._next_arrival_index = 0

        self._request_cap = config.max_num_seqs  # per plan; set by schedule()
        self._prefill_left = config.max_num_batched_tokens  # prompt tokens; set by schedule()
        self.admitting = True  # False: waiting requests stay waiting (a stage drains)
        self.num_preemptions = 0  # total over the scheduler's life
        self.num_steps_scheduled = 0
        self.max_in_flight_plans = 0  # most plans ever in flight at once

    # ------------------------------------------------------------------ public API

    def add_request(self, request: Request) -> None:
        """Queue a new request (status WAITING) at the back of the waiting queue.

        Raises ValueError for an empty or too-long prompt, a prompt that can never fit in
        the KV cache, or a ``request_id`` already in use.
        """
        check_new_request(request, self._requests, self.config.max_model_len,
                          self.block_pool.num_blocks, self.block_size)
        request.arrival_index = self._next_arrival_index
        self._next_arrival_index += 1
        self._requests[request.request_id] = request
        self._waiting.append(request)

    def abort_requests(self, request_ids: str | Iterable[str]) -> list[Request]:
        """Finish the given requests with reason "abort" (unknown or finished ids are ignored).

        Their blocks are freed now, or when their in-flight plan returns. Returns the
        requests that existed and were unfinished.
        """
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        aborted = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is not None and not request.is_finished:
                self._finish(request, "abort")
                aborted.append(request)
        return aborted

    def finish_request(self, request_id: str, finish_reason: str,
                       stop_reason: int | str | None = None) -> None:
        """Finish a request the engine decided is done (e.g. a stop string was detokenized).

        A no-op for unknown or already finished requests. Frees the blocks like an abort.
        """
        if finish_reason not in FINISH_REASON_TO_STATUS:
            raise ValueError(f"finish_reason must be one of {sorted(FINISH_REASON_TO_STATUS)}, "
                             f"got {finish_reason!r}")
        request = self._requests.get(request_id)
        if request is not None and not request.is_finished:
            self._finish(request, finish_reason, stop_reason)

    def schedule(self, max_num_requests: int | None = None,
                 prefill_budget: int | None = None) -> StepPlan | None:
        """Plan the next step from requests not in flight; None if nothing can run now.

        ``max_num_requests`` caps the requests in this plan, so a pipeline can spread its
        requests evenly over several micro-batches; ``prefill_budget`` its prompt tokens
        while a request decodes, so no decode stalls behind a long prompt (``stall_bound``).
        Allocates blocks (preempting if needed), advances ``num_computed_tokens`` of every
        planned request and marks it ``in_flight`` until ``update_from_output``.
        """
        budget = self.config.max_num_batched_tokens
        self._request_cap = max_num_requests or self.config.max_num_seqs
        bounded = prefill_budget is not None and self.num_decoding
        self._prefill_left = max(1, prefill_budget) if bounded else budget
        scheduled: list[Request] = []
        batch: list[BatchEntry] = []
        budget = self._schedule_running(scheduled, batch, budget)
        self._schedule_waiting(scheduled, batch, budget)
        if not batch:
            return None
        plan = self._make_plan(scheduled, batch)
        self._in_flight.append(_InFlightPlan(plan.step_id, scheduled))
        self.num_steps_scheduled += 1
        self.max_in_flight_plans = max(self.max_in_flight_plans, len(self._in_flight))
        return plan

    def update_from_output(self, plan: StepPlan, output: StepOutput) -> list[Request]:
        """Apply the tokens sampled in ``plan`` (any plan in flight).

        Clears ``in_flight``, appends sampled tokens, checks stop conditions and frees the
        blocks of finished requests. Returns the requests that got a token in this step
        (some of them now finished), in batch order.
        """
        in_flight = self._pop_in_flight(plan, output)
        updated = []
        for entry, request in zip(plan.batch, in_flight.requests):
            request.in_flight = False
            if request.is_finished:  # finished or aborted while in flight: drop its token
                self._release(request)
            elif entry.sample:
                self._append_token(request, output.sampled_token_ids[entry.request_id])
                updated.append(request)
        return updated

    def requeue_all(self) -> list[Request]:
        """The executors lost every request's state (a stage was lost): forget the plans in
        flight, free every block and put every unfinished request back in the waiting queue,
        in arrival order, to be recomputed from its prompt and the tokens it generated so far
        (as a preemption does). Tokens of the forgotten plans never count. -> the requests
        that were running (their KV is rebuilt: a replay)."""
        for in_flight in self._in_flight:
            for request in in_flight.requests:
                request.in_flight = False
                if request.is_finished:
                    self._release(request)
        self._in_flight.clear()
        running = list(self._running)
        for request in running:
            self.block_pool.free(request.block_ids)
            request.block_ids = []
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
            request.num_replays += 1
        for request in [*running, *self._waiting]:
            request.known_to_executors = False
            request.num_tokens_sent = request.num_blocks_sent = 0
        self._running = []
        self._waiting = collections.deque(sorted([*running, *self._waiting],
                                                 key=lambda r: r.arrival_index))
        self._freed_request_ids = []  # the executors start from nothing
        assert self.block_pool.num_used_blocks == 0, self.block_pool
        return running

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self._waiting) + len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_decoding(self) -> int:
        """Running requests past their prefill (each step computes one token of each)."""
        return sum(1 for r in self._running if r.is_decoding)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.block_pool.num_used_blocks

    @property
    def num_in_flight_plans(self) -> int:
        return len(self._in_flight)

    # ------------------------------------------------------------------ scheduling

    def _schedule_running(self, scheduled: list[Request], batch: list[BatchEntry],
                          budget: int) -> int:
        """Continue running requests in arrival order; returns the budget left."""
        for request in list(self._running):  # copy: preemption removes from _running
            if budget == 0 or len(batch) >= self._request_cap:
                break
            if request.in_flight or request.status is not RequestStatus.RUNNING:
                continue
            num_tokens = request.num_tokens - request.num_computed_tokens
            assert num_tokens > 0, request
            limit = budget if request.is_decoding else min(budget, self._prefill_left)
            if num_tokens > limit:
                if not self.config.enable_chunked_prefill or limit == 0:
                    continue
                num_tokens = limit
            if not self._grow_or_preempt(request, request.num_computed_tokens + num_tokens):
                continue
            if not request.is_decoding:
                self._prefill_left -= num_tokens
            self._add_to_batch(request, num_tokens, scheduled, batch)
            budget -= num_tokens
        return budget

    def _schedule_waiting(self, scheduled: list[Request], batch: list[BatchEntry],
                          budget: int) -> None:
        """Admit waiting requests FCFS until one does not fit (no skipping ahead)."""
        while (self.admitting and self._waiting and min(budget, self._prefill_left) > 0
               and len(self._running) < self.config.max_num_seqs
               and len(batch) < self._request_cap):
            request = self._waiting[0]
            assert request.num_computed_tokens == 0 and not request.block_ids, request
            num_tokens = request.num_tokens  # a resumed request recomputes its outputs too
            limit = min(budget, self._prefill_left)
            if num_tokens > limit:
                if not self.config.enable_chunked_prefill:
                    break
                num_tokens = limit
            num_blocks = self._num_blocks_for(num_tokens)
            if not self.block_pool.can_allocate(num_blocks):
                break
            self._waiting.popleft()
            request.block_ids = self.block_pool.allocate(num_blocks)
            request.status = RequestStatus.RUNNING
            bisect.insort(self._running, request, key=lambda r: r.arrival_index)
            self._add_to_batch(request, num_tokens, scheduled, batch)
            budget -= num_tokens
            self._prefill_left -= num_tokens

    def _grow_or_preempt(self, request: Request, num_tokens: int) -> bool:
        """Give ``request`` blocks for its first ``num_tokens`` tokens, preempting if needed.

        Returns False if ``request`` itself had to be preempted (every later arrival that
        could have been preempted instead is in flight).
        """
        num_new_blocks = max(0, self._num_blocks_for(num_tokens) - len(request.block_ids))
        while not self.block_pool.can_allocate(num_new_blocks):
            victim = next(r for r in reversed(self._running) if not r.in_flight)  # latest
            self._preempt(victim)
            if victim is request:
                return False
        request.block_ids.extend(self.block_pool.allocate(num_new_blocks))
        return True

    def _preempt(self, request: Request) -> None:
        """Free all of ``request``'s blocks and put it at the front of the waiting queue."""
        assert request.status is RequestStatus.RUNNING and not request.in_flight, request
        self._running.remove(request)
        self.block_pool.free(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._forget_on_executors(request)
        self._waiting.appendleft(request)
        logger.debug("preempted request %s (%d tokens, %d free blocks)", request.request_id,
                     request.num_tokens, self.block_pool.num_free_blocks)

    def _add_to_batch(self, request: Request, num_tokens: int, scheduled: list[Request],
                      batch: list[BatchEntry]) -> None:
        """Plan positions [num_computed, num_computed + num_tokens) and mark it in flight."""
        start = request.num_computed_tokens
        end = start + num_tokens
        assert end <= request.num_tokens
        assert len(request.block_ids) * self.block_size >= end, request
        batch.append(BatchEntry(request.request_id, start, num_tokens,
                                sample=end == request.num_tokens))
        scheduled.append(request)
        request.num_computed_tokens = end
        request.in_flight = True

    def _make_plan(self, scheduled: list[Request], batch: list[BatchEntry]) -> StepPlan:
        plan = StepPlan(step_id=self._next_step_id, batch=batch,
                        freed_request_ids=self._freed_request_ids)
        self._next_step_id += 1
        self._freed_request_ids = []
        for request in scheduled:
            if request.known_to_executors:
                plan.cached_requests.append(cached_request_message(request))
            else:
                plan.new_requests.append(new_request_message(request))
            request.num_tokens_sent = request.num_tokens
            request.num_blocks_sent = len(request.block_ids)
        return plan

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ outputs and finishing

    def _pop_in_flight(self, plan: StepPlan, output: StepOutput) -> _InFlightPlan:
        """Check ``output`` answers an in-flight plan and remove that plan. Plans may return
        in any order (a decode micro-batch may overtake a prefill whose activations are still
        crossing a slow link): they hold disjoint requests."""
        index = next((i for i, p in enumerate(self._in_flight) if p.step_id == plan.step_id), None)
        if index is None:
            raise ValueError(f"step {plan.step_id} is not in flight (in flight: "
                             f"{[p.step_id for p in self._in_flight]})")
        if output.step_id != plan.step_id:
            raise ValueError(f"output of step {output.step_id} given for step {plan.step_id}")
        missing = [e.request_id for e in plan.batch
                   if e.sample and e.request_id not in output.sampled_token_ids]
        if missing:
            raise ValueError(f"step {plan.step_id} output lacks sampled tokens for {missing}")
        in_flight = self._in_flight[index]
        del self._in_flight[index]
        return in_flight

    def _append_token(self, request: Request, token_id: int) -> None:
        request.output_token_ids.append(token_id)
        stop = stop_condition(request, token_id, self.max_len)
        if stop is not None:
            self._finish(request, *stop)

    def _finish(self, request: Request, finish_reason: str,
                stop_reason: int | str | None = None) -> None:
        """Mark finished and leave the queues; blocks are freed unless a plan still uses them."""
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        request.status = FINISH_REASON_TO_STATUS[finish_reason]
        request.finish_reason = finish_reason
        request.stop_reason = stop_reason
        self._forget_on_executors(request)
        if not request.in_flight:
            self._release(request)

    def _release(self, request: Request) -> None:
        """Free a finished request's blocks and forget it."""
        assert request.is_finished and not request.in_flight, request
        self.block_pool.free(request.block_ids)
        request.block_ids = []
        del self._requests[request.request_id]

    def _forget_on_executors(self, request: Request) -> None:
        """Executors must drop ``request``'s state; it is sent in full if it runs again."""
        if request.known_to_executors:
            self._freed_request_ids.append(request.request_id)
        request.known_to_executors = False
        request.num_tokens_sent = 0
        request.num_blocks_sent = 0
