"""Scheduler tests against a fake executor that only knows what the plans tell it."""

from __future__ import annotations

import collections
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molink.config import SchedulerConfig
from molink.messages import StepOutput, StepPlan
from molink.sampling_params import SamplingParams
from molink.scheduler import Request, RequestStatus, Scheduler

VOCAB = 1000


def hashed_token(request_id: str, token_ids: list[int], num_prompt_tokens: int) -> int:
    """Deterministic in the request and its whole token list, like a greedy model."""
    return zlib.crc32(repr(token_ids).encode(), zlib.crc32(request_id.encode())) % VOCAB


class MirrorExecutor:
    """Rebuilds per-request state only from new/cached/freed messages, like a real executor.

    It checks every plan against that state (positions contiguous, blocks cover them,
    sample exactly when caught up) and samples from the tokens it holds, so a missing or
    wrong delta changes the tokens and the comparison with the reference fails.
    """

    def __init__(self, block_size: int, next_token=hashed_token) -> None:
        self.block_size = block_size
        self.next_token = next_token
        self.tokens: dict[str, list[int]] = {}
        self.num_prompt: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}

    def run(self, plan: StepPlan) -> StepOutput:
        self._apply_messages(plan)
        sampled = {}
        for entry in plan.batch:
            rid = entry.request_id
            assert entry.num_tokens > 0
            assert entry.start == self.num_computed[rid], "positions must be contiguous"
            end = entry.start + entry.num_tokens
            assert end <= len(self.tokens[rid])
            assert len(self.blocks[rid]) == -(-end // self.block_size), "blocks grow as needed"
            assert entry.sample == (end == len(self.tokens[rid]))
            self.num_computed[rid] = end
            if entry.sample:
                sampled[rid] = self.next_token(rid, self.tokens[rid], self.num_prompt[rid])
        return StepOutput(step_id=plan.step_id, sampled_token_ids=sampled)

    def _apply_messages(self, plan: StepPlan) -> None:
        assert len(set(plan.freed_request_ids)) == len(plan.freed_request_ids)
        for rid in plan.freed_request_ids:
            assert rid in self.tokens, f"freed {rid} that executors never held"
            for table in (self.tokens, self.num_prompt, self.blocks, self.num_computed):
                del table[rid]
        for new in plan.new_requests:
            assert new.request_id not in self.tokens, f"{new.request_id} sent twice as new"
            self.tokens[new.request_id] = list(new.token_ids)
            self.num_prompt[new.request_id] = new.num_prompt_tokens
            self.blocks[new.request_id] = list(new.block_ids)
            self.num_computed[new.request_id] = 0
        for cached in plan.cached_requests:
            self.tokens[cached.request_id].extend(cached.new_token_ids)
            self.blocks[cached.request_id].extend(cached.new_block_ids)
        sent = [r.request_id for r in plan.new_requests] + [
            r.request_id for r in plan.cached_requests]
        assert sorted(sent) == sorted(plan.request_ids)
        assert len(set(plan.request_ids)) == len(plan.request_ids)


def make_prompt(seed: int, length: int) -> list[int]:
    return [(seed * 131 + i * 17) % VOCAB for i in range(length)]


def make_request(rid: str, prompt_len: int = 5, eos=frozenset(), **params) -> Request:
    params.setdefault("max_tokens", 8)
    return Request(rid, make_prompt(zlib.crc32(rid.encode()), prompt_len),
                   SamplingParams(**params), eos_token_ids=frozenset(eos))


def reference_output(request: Request, max_len: int, next_token=hashed_token) -> list[int]:
    """What the request generates when nothing is batched, chunked or preempted."""
    params = request.sampling_params
    tokens = list(request.prompt_token_ids)
    output: list[int] = []
    while True:
        token = next_token(request.request_id, tokens, request.num_prompt_tokens)
        tokens.append(token)
        output.append(token)
        may_stop = len(output) >= params.min_tokens
        if may_stop and token in params.stop_token_id_set:
            return output
        if may_stop and token in request.eos_token_ids and not params.ignore_eos:
            return output
        if params.max_tokens is not None and len(output) >= params.max_tokens:
            return output
        if len(tokens) >= max_len:
            return output


def run_to_completion(scheduler: Scheduler, executor: MirrorExecutor, max_in_flight: int = 1,
                      max_steps: int = 10_000, on_plan=None) -> list[StepPlan]:
    plans = []
    pending: collections.deque = collections.deque()
    for _ in range(max_steps):
        while len(pending) < max_in_flight and (plan := scheduler.schedule()) is not None:
            for in_flight, _ in pending:
                assert set(in_flight.request_ids).isdisjoint(plan.request_ids)
            if on_plan is not None:
                on_plan(plan)
            plans.append(plan)
            pending.append((plan, executor.run(plan)))
        if not pending:
            break
        scheduler.update_from_output(*pending.popleft())
    assert not pending
    assert not scheduler.has_unfinished_requests()
    return plans


def new_scheduler(num_blocks: int = 64, block_size: int = 4, **config) -> Scheduler:
    config.setdefault("max_model_len", 64)
    config.setdefault("max_num_batched_tokens", 64)
    return Scheduler(SchedulerConfig(**config), num_blocks=num_blocks, block_size=block_size)


def step(scheduler: Scheduler, executor: MirrorExecutor) -> StepPlan:
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.update_from_output(plan, executor.run(plan))
    return plan


# ---------------------------------------------------------------------- add_request


def test_add_request_validation():
    scheduler = new_scheduler(num_blocks=4, block_size=4, max_model_len=32,
                              max_num_batched_tokens=32)
    scheduler.add_request(make_request("a"))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a"))
    with pytest.raises(ValueError, match="must not be empty"):
        scheduler.add_request(make_request("b", prompt_len=0))
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_request("c", prompt_len=32))
    with pytest.raises(ValueError, match="KV cache"):
        scheduler.add_request(make_request("d", prompt_len=16))  # 17 tokens need 5 blocks
    scheduler.add_request(make_request("e", prompt_len=15))  # 16 tokens fit 4 blocks exactly
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(SchedulerConfig(), num_blocks=4, block_size=0)
    assert scheduler.num_waiting == 2


def test_nothing_to_schedule_returns_none():
    scheduler = new_scheduler()
    assert scheduler.schedule() is None
    assert not scheduler.has_unfinished_requests()
    assert scheduler.num_steps_scheduled == 0


# ---------------------------------------------------------------------- plans and deltas


def test_first_step_sends_full_request_then_deltas():
    scheduler = new_scheduler(block_size=4)
    executor = MirrorExecutor(block_size=4)
    request = make_request("a", prompt_len=7, max_tokens=5)
    scheduler.add_request(request)

    plan = scheduler.schedule()
    assert plan.step_id == 0
    [new] = plan.new_requests
    assert new.token_ids == request.prompt_token_ids
    assert new.num_prompt_tokens == 7
    assert new.block_ids == [0, 1]
    assert plan.cached_requests == [] and plan.freed_request_ids == []
    [entry] = plan.batch
    assert (entry.start, entry.num_tokens, entry.sample) == (0, 7, True)
    assert request.in_flight and request.num_computed_tokens == 7
    assert request.status is RequestStatus.RUNNING

    updated = scheduler.update_from_output(plan, executor.run(plan))
    assert updated == [request]
    assert not request.in_flight and request.num_output_tokens == 1

    plan = scheduler.schedule()  # decode position 7: fills block 1
    assert plan.step_id == 1 and plan.new_requests == []
    [cached] = plan.cached_requests
    assert cached.new_token_ids == request.output_token_ids and cached.new_block_ids == []
    [entry] = plan.batch
    assert (entry.start, entry.num_tokens, entry.sample) == (7, 1, True)
    scheduler.update_from_output(plan, executor.run(plan))

    plan = scheduler.schedule()  # decode position 8: needs a third block
    [cached] = plan.cached_requests
    assert cached.new_token_ids == request.output_token_ids[1:]
    assert cached.new_block_ids == [2]
    assert plan.batch[0].start == 8
    scheduler.update_from_output(plan, executor.run(plan))


def test_continuous_batching_runs_all_to_completion():
    scheduler = new_scheduler(block_size=4)
    executor = MirrorExecutor(block_size=4)
    requests = [make_request(f"r{i}", prompt_len=3 + 2 * i, max_tokens=4 + i) for i in range(5)]
    for request in requests:
        scheduler.add_request(request)
    plans = run_to_completion(scheduler, executor)
    assert len(plans[0].batch) == 5  # everyone fits the first step
    for request in requests:
        assert request.status is RequestStatus.FINISHED_LENGTH
        assert request.finish_reason == "length" and request.stop_reason is None
        assert request.output_token_ids == reference_output(request, scheduler.max_len)
        assert request.block_ids == []
        assert scheduler.get_request(request.request_id) is None
    assert scheduler.num_free_blocks == 64 and scheduler.num_used_blocks == 0
    assert scheduler.num_running == 0 and scheduler.num_waiting == 0
    assert scheduler.num_steps_scheduled == len(plans) == 8
    assert [p.step_id for p in plans] == list(range(len(plans)))
    # Every finished request is dropped on the executors, exactly once.
    freed = [rid for plan in plans for rid in plan.freed_request_ids]
    assert len(freed) == len(set(freed))


def test_new_request_joins_a_running_batch():
    scheduler = new_scheduler()
    executor = MirrorExecutor(block_size=4)
    first = make_request("first", max_tokens=10)
    scheduler.add_request(first)
    step(scheduler, executor)
    step(scheduler, executor)
    second = make_request("second", prompt_len=9, max_tokens=3)
    scheduler.add_request(second)
    plan = step(scheduler, executor)
    assert plan.request_ids == ["first", "second"]  # running first, then admitted
    assert [e.num_tokens for e in plan.batch] == [1, 9]
    assert [r.request_id for r in plan.new_requests] == ["second"]
    assert [r.request_id for r in plan.cached_requests] == ["first"]
    run_to_completion(scheduler, executor)
    assert first.output_token_ids == reference_output(first, scheduler.max_len)
    assert second.output_token_ids == reference_output(second, scheduler.max_len)


# ---------------------------------------------------------------------- budgets


def test_chunked_prefill_respects_token_budget():
    scheduler = new_scheduler(max_num_batched_tokens=8, block_size=4)
    executor = MirrorExecutor(block_size=4)
    requests = [make_request(f"r{i}", prompt_len=20 - i, max_tokens=5) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    plans = run_to_completion(scheduler, executor)  # the executor checks positions
    assert all(plan.num_tokens <= 8 for plan in plans)
    assert plans[0].num_tokens == 8 and not plans[0].batch[0].sample
    assert [(e.start, e.num_tokens) for e in plans[0].batch] == [(0, 8)]
    chunks = [(e.start, e.num_tokens) for p in plans for e in p.batch if e.request_id == "r0"]
    assert chunks[:3] == [(0, 8), (8, 8), (16, 4)]
    for request in requests:
        assert request.output_token_ids == reference_output(request, scheduler.max_len)


def test_chunked_prefill_fills_leftover_budget_with_next_prompt():
    scheduler = new_scheduler(max_num_batched_tokens=10, block_size=4)
    executor = MirrorExecutor(block_size=4)
    scheduler.add_request(make_request("a", prompt_len=6))
    scheduler.add_request(make_request("b", prompt_len=9))
    plan = step(scheduler, executor)
    assert [(e.request_id, e.start, e.num_tokens, e.sample) for e in plan.batch] == [
        ("a", 0, 6, True), ("b", 0, 4, False)]
    plan = step(scheduler, executor)
    assert [(e.request_id, e.start, e.num_tokens, e.sample) for e in plan.batch] == [
        ("a", 6, 1, True), ("b", 4, 5, True)]


def test_without_chunked_prefill_a_prompt_waits_for_budget():
    scheduler = new_scheduler(max_num_batched_tokens=32, max_model_len=32,
                              enable_chunked_prefill=False)
    executor = MirrorExecutor(block_size=4)
    requests = [make_request(f"r{i}", prompt_len=20, max_tokens=4) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    plans = run_to_completion(scheduler, executor)
    assert plans[0].request_ids == ["r0"]
    assert plans[1].request_ids == ["r0", "r1"]  # 1 decode + 20 prompt tokens
    for plan in plans:
        assert plan.num_tokens <= 32
        for entry in plan.batch:
            assert entry.sample  # prompts are never cut
    for request in requests:
        assert request.output_token_ids == reference_output(request, scheduler.max_len)


def test_max_num_seqs_limits_running_requests():
    scheduler = new_scheduler(max_num_seqs=2)
    executor = MirrorExecutor(block_size=4)
    requests = [make_request(f"r{i}", max_tokens=3 + i) for i in range(5)]
    for request in requests:
        scheduler.add_request(request)

    def check(plan):
        assert len(plan.batch) <= 2
        assert scheduler.num_running <= 2

    plans = run_to_completion(scheduler, executor, on_plan=check)
    assert plans[0].request_ids == ["r0", "r1"]
    for request in requests:
        assert request.output_token_ids == reference_output(request, scheduler.max_len)


def test_fcfs_admission_does_not_skip_a_blocked_request():
    # 6 blocks of 4: "big" (14 tokens -> 4 blocks) cannot join while "a" holds 3 blocks,
    # so "small" (1 block, would fit) must not jump the queue.
    scheduler = new_scheduler(num_blocks=6, block_size=4)
    executor = MirrorExecutor(block_size=4)
    scheduler.add_request(make_request("a", prompt_len=9, max_tokens=6))
    step(scheduler, executor)
    scheduler.add_request(make_request("big", prompt_len=14, max_tokens=2))
    scheduler.add_request(make_request("small", prompt_len=2, max_tokens=2))
    plan = step(scheduler, executor)
    assert plan.request_ids == ["a"]
    assert scheduler.num_waiting == 2
    run_to_completion(scheduler, executor)


# ---------------------------------------------------------------------- preemption


def _run_batch(num_blocks: int, block_size: int, max_in_flight: int = 1, **config):
    scheduler = new_scheduler(num_blocks=num_blocks, block_size=block_size, **config)
    executor = MirrorExecutor(block_size=block_size)
    requests = [make_request(f"r{i}", prompt_len=5 + i, max_tokens=12 + i) for i in range(5)]
    for request in requests:
        scheduler.add_request(request)
    plans = run_to_completion(scheduler, executor, max_in_flight=max_in_flight)
    return scheduler, requests, plans


@pytest.mark.parametrize("max_in_flight", [1, 2, 3])
def test_preemption_keeps_token_sequences(max_in_flight):
    _, big_requests, _ = _run_batch(num_blocks=64, block_size=4)
    scheduler, requests, plans = _run_batch(num_blocks=7, block_size=4,
                                            max_in_flight=max_in_flight)
    assert scheduler.num_preemptions > 0
    assert scheduler.num_preemptions == sum(r.num_preemptions for r in requests)
    for small, big in zip(requests, big_requests):
        assert small.output_token_ids == big.output_token_ids
        assert small.output_token_ids == reference_output(small, max_len=64)
    assert scheduler.num_free_blocks == 7
    for plan in plans:
        assert len(plan.freed_request_ids) == len(set(plan.freed_request_ids))


def _two_requests(num_blocks: int, prompt_len: int, max_tokens: tuple[int, int]):
    """A scheduler with ``num_blocks`` blocks of 2 tokens, its executor, and requests "a" and
    "b" (not yet added) of ``max_tokens`` each."""
    scheduler = new_scheduler(num_blocks=num_blocks, block_size=2)
    executor = MirrorExecutor(block_size=2)
    a = make_request("a", prompt_len=prompt_len, max_tokens=max_tokens[0])
    b = make_request("b", prompt_len=prompt_len, max_tokens=max_tokens[1])
    return scheduler, executor, a, b


def test_preempted_request_is_resent_in_full():
    # 4 blocks of 2 tokens. "a" and "b" (3-token prompts) each take 2 blocks; the first
    # decode of "a" (position 4) needs a fifth block, so "b" (the later arrival) is preempted.
    scheduler, executor, a, b = _two_requests(num_blocks=4, prompt_len=3, max_tokens=(4, 3))
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, executor)
    step(scheduler, executor)  # both decode position 3, still within 2 blocks
    b_outputs = list(b.output_token_ids)
    assert len(b_outputs) == 2

    plan = step(scheduler, executor)
    assert plan.request_ids == ["a"] and plan.freed_request_ids == ["b"]
    assert b.status is RequestStatus.PREEMPTED and b.num_preemptions == 1
    assert b.block_ids == [] and b.num_computed_tokens == 0
    assert scheduler.num_preemptions == 1 and scheduler.num_waiting == 1

    plan = step(scheduler, executor)  # "a" finishes at max_tokens this step
    assert a.is_finished
    plan = scheduler.schedule()  # "b" resumes: dropped on executors, then sent in full
    assert plan.freed_request_ids == ["a"]
    [new] = plan.new_requests
    assert new.request_id == "b"
    assert new.token_ids == b.prompt_token_ids + b_outputs
    assert new.num_prompt_tokens == 3
    [entry] = plan.batch
    assert (entry.start, entry.num_tokens, entry.sample) == (0, 5, True)
    scheduler.update_from_output(plan, executor.run(plan))
    assert b.is_finished and b.output_token_ids[:2] == b_outputs
    assert b.output_token_ids == reference_output(b, scheduler.max_len)


def test_preempted_request_goes_to_front_of_waiting_queue():
    scheduler = new_scheduler(num_blocks=4, block_size=2)
    executor = MirrorExecutor(block_size=2)
    for rid in ("a", "b"):
        scheduler.add_request(make_request(rid, prompt_len=3, max_tokens=8))
    step(scheduler, executor)
    step(scheduler, executor)
    scheduler.add_request(make_request("c", prompt_len=1, max_tokens=1))
    plan = step(scheduler, executor)  # "a" preempts "b"; "c" would fit but queues behind "b"
    assert plan.request_ids == ["a"]
    assert scheduler.get_request("b").status is RequestStatus.PREEMPTED
    assert scheduler.get_request("c").status is RequestStatus.WAITING
    while scheduler.get_request("a") is not None:
        step(scheduler, executor)
    plan = step(scheduler, executor)
    assert plan.request_ids[0] == "b"  # ahead of "c", which arrived later


def test_in_flight_requests_are_never_preempted():
    # 2 blocks of 2 tokens. "a" runs alone in plan 1; "b" joins in plan 2 while "a" is in
    # flight. When plan 1 returns, "a" needs a second block; the later arrival "b" is in
    # flight, so "a" preempts itself instead.
    scheduler, executor, a, b = _two_requests(num_blocks=2, prompt_len=2, max_tokens=(5, 5))
    scheduler.add_request(a)
    plan_1 = scheduler.schedule()
    output_1 = executor.run(plan_1)
    scheduler.add_request(b)
    plan_2 = scheduler.schedule()
    assert plan_2.request_ids == ["b"]
    output_2 = executor.run(plan_2)
    scheduler.update_from_output(plan_1, output_1)

    assert scheduler.schedule() is None
    assert a.status is RequestStatus.PREEMPTED and a.num_preemptions == 1
    assert b.status is RequestStatus.RUNNING and b.block_ids == [1]
    assert scheduler.num_waiting == 1 and scheduler.num_free_blocks == 1

    scheduler.update_from_output(plan_2, output_2)
    plan = scheduler.schedule()
    assert plan.request_ids == ["b"] and plan.freed_request_ids == ["a"]
    scheduler.update_from_output(plan, executor.run(plan))
    assert b.finish_reason == "length" and b.num_tokens == 4  # the cache holds 4 tokens
    plans = run_to_completion(scheduler, executor)
    assert plans[0].freed_request_ids == ["b"]
    assert plans[0].new_requests[0].token_ids == a.all_token_ids[:3]
    assert a.output_token_ids == reference_output(a, scheduler.max_len)
    assert b.output_token_ids == reference_output(b, scheduler.max_len)


# ---------------------------------------------------------------------- abort and finish


def test_abort_frees_blocks_and_tells_executors():
    scheduler = new_scheduler()
    executor = MirrorExecutor(block_size=4)
    running = make_request("running", prompt_len=9, max_tokens=20)
    waiting = make_request("waiting", prompt_len=3)
    scheduler.add_request(running)
    step(scheduler, executor)
    scheduler.add_request(waiting)
    assert scheduler.num_used_blocks == 3

    aborted = scheduler.abort_requests(["running", "waiting", "unknown"])
    assert aborted == [running, waiting]
    for request in aborted:
        assert request.status is RequestStatus.FINISHED_ABORTED
        assert request.finish_reason == "abort" and request.block_ids == []
        assert scheduler.get_request(request.request_id) is None
    assert scheduler.num_used_blocks == 0
    assert not scheduler.has_unfinished_requests()
    assert scheduler.abort_requests("running") == []  # already finished

    scheduler.add_request(make_request("next"))
    plan = step(scheduler, executor)
    assert plan.freed_request_ids == ["running"]  # "waiting" was never sent


def test_abort_while_in_flight_frees_blocks_when_the_plan_returns():
    scheduler = new_scheduler(num_blocks=8, block_size=4)
    executor = MirrorExecutor(block_size=4)
    request = make_request("a", prompt_len=9)
    scheduler.add_request(request)
    plan = scheduler.schedule()
    output = executor.run(plan)
    assert scheduler.abort_requests(["a"]) == [request]
    assert request.block_ids == [0, 1, 2] and scheduler.num_used_blocks == 3
    assert scheduler.get_request("a") is request  # still owned until the plan returns
    with pytest.raises(ValueError, match="in use"):
        scheduler.add_request(make_request("a"))

    scheduler.add_request(make_request("b", prompt_len=20))
    plan_b = scheduler.schedule()
    assert plan_b.freed_request_ids == ["a"]
    assert set(plan_b.new_requests[0].block_ids).isdisjoint({0, 1, 2})
    output_b = executor.run(plan_b)

    assert scheduler.update_from_output(plan, output) == []  # sampled token is dropped
    assert request.output_token_ids == [] and request.block_ids == []
    assert scheduler.get_request("a") is None
    assert scheduler.num_used_blocks == 5
    scheduler.update_from_output(plan_b, output_b)
    run_to_completion(scheduler, executor)
    assert scheduler.num_used_blocks == 0


def test_finish_request_for_stop_strings():
    scheduler = new_scheduler()
    executor = MirrorExecutor(block_size=4)
    request = make_request("a", prompt_len=9, max_tokens=20)
    scheduler.add_request(request)
    step(scheduler, executor)
    scheduler.finish_request("a", "stop", stop_reason="\n\n")
    assert request.status is RequestStatus.FINISHED_STOPPED
    assert (request.finish_reason, request.stop_reason) == ("stop", "\n\n")
    assert request.num_output_tokens == 1
    assert scheduler.num_used_blocks == 0
    scheduler.finish_request("a", "stop")  # already finished: no-op
    scheduler.finish_request("never-added", "length")  # unknown: no-op
    with pytest.raises(ValueError, match="finish_reason"):
        scheduler.finish_request("a", "done")
    assert not scheduler.has_unfinished_requests()


def test_finish_request_while_waiting():
    scheduler = new_scheduler()
    request = make_request("a")
    scheduler.add_request(request)
    scheduler.finish_request("a", "length")
    assert request.status is RequestStatus.FINISHED_LENGTH
    assert scheduler.schedule() is None


# ---------------------------------------------------------------------- stop conditions


def scripted(script: dict[str, list[int]]):
    def next_token(rid, tokens, num_prompt):
        return script[rid][len(tokens) - num_prompt]
    return next_token


STOP_CASES = [
    # (sampling params, eos, script, expected output, finish_reason, stop_reason)
    ({"max_tokens": 10}, {7}, [1, 7, 2], [1, 7], "stop", None),
    ({"max_tokens": 4, "ignore_eos": True}, {7}, [1, 7, 7, 2, 3], [1, 7, 7, 2], "length", None),
    ({"max_tokens": 10, "min_tokens": 3}, {7}, [7, 7, 1, 7, 2], [7, 7, 1, 7], "stop", None),
    ({"max_tokens": 10, "min_tokens": 3}, {7}, [7, 7, 7, 2], [7, 7, 7], "stop", None),
    ({"max_tokens": 10, "stop_token_ids": [5]}, set(), [1, 5, 2], [1, 5], "stop", 5),
    ({"max_tokens": 10, "stop_token_ids": [5], "ignore_eos": True}, {5}, [1, 5], [1, 5], "stop", 5),
    ({"max_tokens": 10, "stop_token_ids": [5], "min_tokens": 2}, set(), [5, 5], [5, 5], "stop", 5),
    ({"max_tokens": 3}, {7}, [1, 2, 3, 4], [1, 2, 3], "length", None),
    ({"max_tokens": 3, "stop_token_ids": [3]}, set(), [1, 2, 3], [1, 2, 3], "stop", 3),
    ({"max_tokens": None}, set(), list(range(20)), [0, 1, 2, 3, 4], "length", None),
]


@pytest.mark.parametrize("params,eos,script,expected,reason,stop_reason", STOP_CASES)
def test_stop_conditions(params, eos, script, expected, reason, stop_reason):
    scheduler = new_scheduler(max_model_len=10, max_num_batched_tokens=10)
    executor = MirrorExecutor(block_size=4, next_token=scripted({"a": script}))
    request = make_request("a", prompt_len=5, eos=eos, **params)
    scheduler.add_request(request)
    run_to_completion(scheduler, executor)
    assert request.output_token_ids == expected
    assert request.finish_reason == reason
    assert request.stop_reason == stop_reason
    assert request.status is {"stop": RequestStatus.FINISHED_STOPPED,
                              "length": RequestStatus.FINISHED_LENGTH}[reason]
    assert scheduler.num_used_blocks == 0


def test_length_is_capped_by_kv_cache_capacity():
    # max_model_len allows 64 tokens, but 3 blocks of 4 hold only 12: stop there, do not
    # preempt the request forever.
    scheduler = new_scheduler(num_blocks=3, block_size=4)
    executor = MirrorExecutor(block_size=4)
    request = make_request("a", prompt_len=5, max_tokens=None)
    scheduler.add_request(request)
    run_to_completion(scheduler, executor)
    assert request.num_tokens == 12 and request.finish_reason == "length"
    assert scheduler.num_preemptions == 0


# ---------------------------------------------------------------------- in-flight plans


def test_two_plans_in_flight_hold_disjoint_requests():
    scheduler = new_scheduler()
    executor = MirrorExecutor(block_size=4)
    requests = [make_request(f"r{i}", max_tokens=6) for i in range(4)]
    scheduler.add_request(requests[0])
    scheduler.add_request(requests[1])
    first = scheduler.schedule()
    scheduler.add_request(requests[2])
    scheduler.add_request(requests[3])
    second = scheduler.schedule()
    assert first.request_ids == ["r0", "r1"] and second.request_ids == ["r2", "r3"]
    assert scheduler.schedule() is None  # everyone is in flight
    assert scheduler.num_in_flight_plans == 2 and scheduler.max_in_flight_plans == 2
    outputs = [executor.run(first), executor.run(second)]

    # Results may come back out of order (a decode micro-batch overtaking a prefill on a
    # slow link): the second plan completes first, and only its requests move on.
    assert scheduler.update_from_output(second, outputs[1]) == requests[2:]
    third = scheduler.schedule()
    assert third.request_ids == ["r2", "r3"]
    assert set(third.request_ids).isdisjoint(first.request_ids)
    outputs.append(executor.run(third))
    assert scheduler.update_from_output(first, outputs[0]) == requests[:2]
    scheduler.update_from_output(third, outputs[2])
    run_to_completion(scheduler, executor, max_in_flight=2)  # checks disjointness
    assert scheduler.max_in_flight_plans == 2
    for request in requests:
        assert request.output_token_ids == reference_output(request, scheduler.max_len)


def test_update_from_output_rejects_bad_outputs():
    scheduler = new_scheduler()
    executor = MirrorExecutor(block_size=4)
    scheduler.add_request(make_request("a"))
    plan = scheduler.schedule()
    with pytest.raises(ValueError, match="lacks"):
        scheduler.update_from_output(plan, StepOutput(step_id=plan.step_id))
    with pytest.raises(ValueError, match="step"):
        scheduler.update_from_output(plan, StepOutput(step_id=plan.step_id + 1))
    output = executor.run(plan)
    assert scheduler.update_from_output(plan, output) == [scheduler.get_request("a")]
    with pytest.raises(ValueError, match="not in flight"):
        scheduler.update_from_output(plan, output)  # returned twice


# ---------------------------------------------------------------------- property test


class _World:
    """Random driver: a scheduler, a mirror executor and the plans in flight."""

    def __init__(self, config: SchedulerConfig, num_blocks: int, block_size: int) -> None:
        self.scheduler = Scheduler(config, num_blocks=num_blocks, block_size=block_size)
        self.executor = MirrorExecutor(block_size=block_size)
        self.config = config
        self.num_blocks = num_blocks
        self.pending: collections.deque = collections.deque()  # (plan, output, blocks)
        self.requests: dict[str, Request] = {}
        self.cut_short: set[str] = set()  # aborted or finished by the caller

    def add(self, prompt_len: int, max_tokens: int | None, eos: frozenset[int]) -> None:
        rid = f"r{len(self.requests)}"
        request = make_request(rid, prompt_len=prompt_len, eos=eos, max_tokens=max_tokens)
        self.requests[rid] = request
        self.scheduler.add_request(request)

    def schedule(self) -> bool:
        plan = self.scheduler.schedule()
        if plan is None:
            return False
        self._check_plan(plan)
        output = self.executor.run(plan)
        blocks = {rid: set(self.executor.blocks[rid]) for rid in plan.request_ids}
        self.pending.append((plan, output, blocks))
        return True

    def complete(self, index: int = 0) -> None:
        """Return the result of the ``index``-th plan in flight (any order is allowed)."""
        plan, output, _ = self.pending[index % len(self.pending)]
        del self.pending[index % len(self.pending)]
        updated = self.scheduler.update_from_output(plan, output)
        assert {r.request_id for r in updated} <= set(plan.request_ids)

    def cut(self, index: int, how: str) -> None:
        rid = f"r{index % max(1, len(self.requests))}"
        if rid not in self.requests:
            return
        if how == "abort":
            self.scheduler.abort_requests([rid])
        else:
            self.scheduler.finish_request(rid, "stop", stop_reason="</s>")
        self.cut_short.add(rid)

    def lose_a_stage(self) -> None:
        """A stage was lost: the plans in flight never return, every executor starts empty,
        and the scheduler requeues everything for replay."""
        running = {r.request_id for r in self.requests.values()
                   if r.status is RequestStatus.RUNNING}
        replayed = self.scheduler.requeue_all()
        assert {r.request_id for r in replayed} == running
        self.pending.clear()
        self.executor = MirrorExecutor(block_size=self.executor.block_size)
        assert self.scheduler.num_used_blocks == 0 and self.scheduler.num_in_flight_plans == 0
        waiting = [r for r in self.requests.values() if not r.is_finished]
        assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in waiting)

    def _check_plan(self, plan: StepPlan) -> None:
        assert plan.num_tokens <= self.config.max_num_batched_tokens
        in_flight_ids = {rid for p, _, _ in self.pending for rid in p.request_ids}
        assert in_flight_ids.isdisjoint(plan.request_ids), "request in two in-flight plans"
        for entry in plan.batch:
            rid = entry.request_id
            if not self.config.enable_chunked_prefill:
                assert entry.sample, "a prompt is cut although chunked prefill is off"
            mine = set(self.requests[rid].block_ids)
            for _, _, blocks in self.pending:  # blocks of in-flight steps are never reused
                for other, used in blocks.items():
                    assert other == rid or mine.isdisjoint(used)

    def check_invariants(self) -> None:
        scheduler = self.scheduler
        owned = [b for r in self.requests.values() for b in r.block_ids]
        assert len(owned) == len(set(owned)), "a block owned by two requests"
        assert len(owned) == scheduler.num_used_blocks
        assert scheduler.num_free_blocks + scheduler.num_used_blocks == self.num_blocks
        assert scheduler.num_running <= self.config.max_num_seqs
        assert scheduler.num_in_flight_plans == len(self.pending)
        in_flight_ids = [rid for p, _, _ in self.pending for rid in p.request_ids]
        assert len(in_flight_ids) == len(set(in_flight_ids))
        for rid, request in self.requests.items():
            assert request.in_flight == (rid in in_flight_ids)
            if request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                assert request.block_ids == [] and request.num_computed_tokens == 0

    def drain(self) -> None:
        while self.pending:
            self.complete()
        for _ in range(5_000):
            if not self.schedule():
                break
            self.complete()
            self.check_invariants()
        assert not self.scheduler.has_unfinished_requests(), "a request never finished"
        assert self.scheduler.num_used_blocks == 0

    def check_outputs(self) -> None:
        for rid, request in self.requests.items():
            assert request.is_finished
            expected = reference_output(request, self.scheduler.max_len)
            if rid in self.cut_short:
                assert expected[:request.num_output_tokens] == request.output_token_ids
            else:
                assert request.output_token_ids == expected


@st.composite
def _setups(draw):
    block_size = draw(st.integers(1, 4))
    num_blocks = draw(st.integers(3, 12))
    max_model_len = draw(st.integers(4, 24))
    chunked = draw(st.booleans())
    low = 1 if chunked else max_model_len
    budget = draw(st.integers(low, max(low, 16)))
    config = SchedulerConfig(max_num_seqs=draw(st.integers(1, 4)),
                             max_num_batched_tokens=budget, max_model_len=max_model_len,
                             enable_chunked_prefill=chunked)
    return config, num_blocks, block_size


_OPS = st.sampled_from(["add", "add", "schedule", "schedule", "complete", "cut", "lose"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=_setups(), data=st.data())
def test_random_interleavings_keep_invariants(setup, data):
    config, num_blocks, block_size = setup
    world = _World(config, num_blocks, block_size)
    max_prompt = min(config.max_model_len - 1, num_blocks * block_size - 1)
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(_OPS)
        if op == "add":
            world.add(prompt_len=data.draw(st.integers(1, max_prompt)),
                      max_tokens=data.draw(st.one_of(st.none(), st.integers(1, 12))),
                      eos=data.draw(st.frozensets(st.integers(0, VOCAB - 1), max_size=40)))
        elif op == "schedule" and len(world.pending) < 3:
            world.schedule()
        elif op == "complete" and world.pending:
            world.complete(data.draw(st.integers(0, 2)))
        elif op == "cut":
            world.cut(data.draw(st.integers(0, 50)), data.draw(st.sampled_from(["abort", "stop"])))
        elif op == "lose":
            world.lose_a_stage()
        world.check_invariants()
    world.drain()
    world.check_outputs()


def test_requeue_all_replays_every_request_to_the_same_tokens():
    """Lose every executor's state in the middle of generation, twice: every request is
    recomputed from its prompt and the tokens it had, arrival order is kept, and the outputs
    equal an uninterrupted run."""
    scheduler = new_scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=16)
    executor = MirrorExecutor(block_size=4)
    requests = [make_request(f"r{i}", prompt_len=5 + i, max_tokens=10) for i in range(4)]
    for request in requests:
        scheduler.add_request(request)
    for _ in range(3):
        step(scheduler, executor)
    in_flight = scheduler.schedule()  # never returns: its tokens must not count
    assert in_flight is not None
    running = [r for r in requests if r.status is RequestStatus.RUNNING]
    assert running and any(r.num_output_tokens for r in running)
    assert scheduler.requeue_all() == running
    assert scheduler.num_used_blocks == 0 and not any(r.in_flight for r in requests)
    executor = MirrorExecutor(block_size=4)  # the stages start empty
    plan = scheduler.schedule()
    assert [n.request_id for n in plan.new_requests] == [e.request_id for e in plan.batch]
    assert plan.freed_request_ids == []  # nothing to free on empty executors
    assert plan.batch[0].request_id == "r0" and plan.batch[0].start == 0
    scheduler.update_from_output(plan, executor.run(plan))
    scheduler.requeue_all()  # a second loss, right after the first replay step
    run_to_completion(scheduler, MirrorExecutor(block_size=4), max_in_flight=2)
    for request in requests:
        assert request.output_token_ids == reference_output(request, max_len=64)
    assert scheduler.num_preemptions == 0


def test_a_draining_scheduler_admits_no_waiting_request():
    scheduler = new_scheduler()
    executor = MirrorExecutor(block_size=4)
    scheduler.add_request(make_request("a", max_tokens=3))
    step(scheduler, executor)
    scheduler.admitting = False
    scheduler.add_request(make_request("b", max_tokens=3))
    plan = step(scheduler, executor)
    assert plan.request_ids == ["a"]
    while (plan := scheduler.schedule()) is not None:
        scheduler.update_from_output(plan, executor.run(plan))
    assert scheduler.num_waiting == 1 and scheduler.num_running == 0
    scheduler.admitting = True
    run_to_completion(scheduler, executor)


def test_schedule_caps_requests_per_plan_for_balanced_microbatches():
    from molink.config import SchedulerConfig
    from molink.messages import StepOutput
    from molink.sampling_params import SamplingParams
    from molink.scheduler import Request, Scheduler

    scheduler = Scheduler(SchedulerConfig(max_model_len=128), num_blocks=64, block_size=4)
    for i in range(10):
        scheduler.add_request(Request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=3)))
    plans = [scheduler.schedule(max_num_requests=4) for _ in range(3)]
    assert [len(p.batch) for p in plans] == [4, 4, 2]
    assert scheduler.schedule(max_num_requests=4) is None  # everything is in flight
    for plan in plans:
        scheduler.update_from_output(plan, StepOutput(plan.step_id, sampled_token_ids={
            e.request_id: 9 for e in plan.batch}))
    assert len(scheduler.schedule().batch) == 10  # no cap: everyone in one plan
