"""The decode-stall bound: the chunk arithmetic, and the scheduler keeping to it (pure,
property-based); the stages' side is in tests/stage/test_inbox.py, end to end in
tests/coordinator/test_stall_free.py."""

from __future__ import annotations

import collections

from hypothesis import given, settings
from hypothesis import strategies as st

from molink.scheduler.microbatch_chooser import StageTiming
from molink.scheduler.stall_bound import MIN_CHUNK_TOKENS, ROUND_SHARE, prefill_chunk_tokens
from tests.scheduler.test_scheduler import (
    MirrorExecutor,
    make_request,
    new_scheduler,
    reference_output,
)

stage_timings = st.builds(StageTiming, st.floats(0.0, 0.05), st.floats(1e-6, 1e-3))


@settings(max_examples=300, deadline=None)
@given(stages=st.lists(stage_timings, min_size=1, max_size=4), decode_tokens=st.integers(1, 256),
       factor=st.floats(0.05, 4.0), max_tokens=st.integers(1, 4096))
def test_the_chunk_is_the_largest_within_the_bound_at_every_stage(stages, decode_tokens, factor,
                                                                   max_tokens):
    chunk = prefill_chunk_tokens(stages, decode_tokens, factor, max_tokens)
    assert min(MIN_CHUNK_TOKENS, max_tokens) <= chunk <= max_tokens

    def within(c: int, tolerance: float = 1e-9) -> bool:  # c prompt tokens beside the decodes
        return all(s.step_s(decode_tokens + c) <= (1 + factor) * s.step_s(decode_tokens)
                   * (1 + tolerance) for s in stages)

    if chunk > MIN_CHUNK_TOKENS:
        assert within(chunk)
        # a step of the chunk alone (another micro-batch's, just ahead) is within it too
        assert all(s.step_s(chunk) <= (1 + factor) * s.step_s(decode_tokens) * (1 + 1e-9)
                   for s in stages)
    if MIN_CHUNK_TOKENS <= chunk < max_tokens:
        assert not within(chunk + 1, tolerance=-1e-9)  # the largest such chunk (rounding aside)


@settings(max_examples=300, deadline=None)
@given(stages=st.lists(stage_timings, min_size=1, max_size=4), decode_tokens=st.integers(1, 256),
       factor=st.floats(0.05, 4.0), max_tokens=st.integers(1, 4096),
       round_s=st.floats(0.0, 1.0))
def test_where_links_set_the_round_a_stage_may_stall_by_its_share_of_it(
        stages, decode_tokens, factor, max_tokens, round_s):
    """With the modelled round: each stage's extra time for the chunk stays within ``factor``
    times the larger of its decode step and ``ROUND_SHARE`` of its share of the round, the
    chunk is the largest such, and never smaller than the step-only chunk."""
    chunk = prefill_chunk_tokens(stages, decode_tokens, factor, max_tokens, round_s=round_s)
    by_steps = prefill_chunk_tokens(stages, decode_tokens, factor, max_tokens)
    assert by_steps <= chunk <= max_tokens
    share_s = ROUND_SHARE * round_s / len(stages)

    def within(c: int, tolerance: float = 1e-9) -> bool:
        return all(s.per_token_s * c <= factor * max(s.step_s(decode_tokens), share_s)
                   * (1 + tolerance) for s in stages)

    if chunk > MIN_CHUNK_TOKENS:
        assert within(chunk)
    if MIN_CHUNK_TOKENS <= chunk < max_tokens:
        assert not within(chunk + 1, tolerance=-1e-9)


def test_a_link_bound_round_lets_long_prompts_move_in_larger_chunks():
    """Emulated RTX 3090 stages of a 32B model in 4 bits over 100 Mbit/20 ms links: a
    ~10 ms decode step (+0.37 ms per prompt token) in a ~170 ms round. By steps, factor 2
    gives 2 x (27 + 10) tokens; by the round's share (0.5 x 170 / 3 = 28.3 ms per stage),
    2 x 76."""
    stage = StageTiming(fixed_s=0.010, per_token_s=0.00037)
    assert prefill_chunk_tokens([stage] * 3, 10, 2.0, 2048) == 74
    assert prefill_chunk_tokens([stage] * 3, 10, 2.0, 2048, round_s=0.170) == 153
    # a round the stages set (compute-bound) changes nothing
    assert prefill_chunk_tokens([stage] * 3, 10, 2.0, 2048, round_s=0.045) == 74


def test_no_bound_without_a_factor_or_measurements():
    stages = [StageTiming(0.01, 0.001)]
    assert prefill_chunk_tokens(stages, 8, 0.0, 2048) == 2048
    assert prefill_chunk_tokens([], 8, 1.0, 2048) == 2048


def test_chunks_follow_the_hardware():
    """Mostly fixed cost per step (a GPU reading its weights): hundreds of prompt tokens
    ride along; every token costly (a CPU): a chunk about the decode batch's size."""
    gpu = StageTiming(fixed_s=2**-5, per_token_s=2**-15)  # 31 ms + 0.03 ms per token
    cpu = StageTiming(fixed_s=2**-9, per_token_s=2**-12)  # 2 ms + 0.24 ms per token
    assert prefill_chunk_tokens([gpu], 16, 1.0, 2048) == 1024 + 16
    assert prefill_chunk_tokens([cpu], 16, 1.0, 2048) == 8 + 16
    assert prefill_chunk_tokens([gpu, cpu], 16, 1.0, 2048) == 8 + 16  # the tightest stage
    assert prefill_chunk_tokens([cpu], 16, 3.0, 2048) == 3 * (8 + 16)
    assert prefill_chunk_tokens([cpu], 16, 0.5, 2048) == 16  # never below the minimum


@settings(max_examples=80, deadline=None)
@given(data=st.data(), budget=st.integers(1, 40), in_flight=st.integers(1, 3))
def test_no_plan_carries_more_prompt_than_the_budget_while_requests_decode(data, budget, in_flight):
    """Requests arrive at random times with random prompts; plans return in any order. Every
    plan made while a request decodes holds at most ``budget`` prompt tokens, every decode
    still gets its token in each plan it is in, and every request finishes with the tokens
    it would have alone (prefill keeps moving)."""
    scheduler = new_scheduler(num_blocks=512, block_size=4, max_model_len=256,
                              max_num_batched_tokens=64)
    executor = MirrorExecutor(block_size=4)
    arrivals = collections.deque(
        make_request(f"r{i}", prompt_len=data.draw(st.integers(1, 200)),
                     max_tokens=data.draw(st.integers(1, 12)))
        for i in range(data.draw(st.integers(1, 8))))
    requests = list(arrivals)
    pending = []
    bounded_plans = 0
    for _ in range(3000):
        if arrivals and (not pending or data.draw(st.booleans())):
            scheduler.add_request(arrivals.popleft())
        while len(pending) < in_flight:
            decoding = {r.request_id for r in requests if r.is_decoding and not r.is_finished
                        and r.status.name == "RUNNING"}
            assert len(decoding) == scheduler.num_decoding
            plan = scheduler.schedule(prefill_budget=budget)
            if plan is None:
                break
            prompt = sum(e.num_tokens for e in plan.batch if e.request_id not in decoding)
            if decoding:
                assert prompt <= budget, (prompt, budget)
                bounded_plans += 1
            assert all(e.num_tokens == 1 for e in plan.batch if e.request_id in decoding)
            pending.append((plan, executor.run(plan)))
        if pending:
            index = data.draw(st.integers(0, len(pending) - 1))
            scheduler.update_from_output(*pending.pop(index))
        elif not arrivals:
            break
    assert not arrivals and not pending and not scheduler.has_unfinished_requests()
    for request in requests:
        assert request.output_token_ids == reference_output(request, scheduler.max_len)


def test_a_long_prompt_moves_in_budget_sized_chunks_beside_decodes():
    scheduler = new_scheduler(num_blocks=512, block_size=4, max_model_len=256,
                              max_num_batched_tokens=64)
    executor = MirrorExecutor(block_size=4)
    short = make_request("short", prompt_len=4, max_tokens=50)
    scheduler.add_request(short)
    plan = scheduler.schedule(prefill_budget=10)
    scheduler.update_from_output(plan, executor.run(plan))
    long = make_request("long", prompt_len=95, max_tokens=1)
    scheduler.add_request(long)
    sizes = []
    while not long.output_token_ids:
        plan = scheduler.schedule(prefill_budget=10)
        sizes.append([e.num_tokens for e in plan.batch])
        scheduler.update_from_output(plan, executor.run(plan))
    assert sizes == [[1, 10]] * 9 + [[1, 5]]  # the short stream got a token every step
