"""A stage's inbox: decodes go ahead of waiting prefill fragments, a fragment is cut to the
stage's own stall bound while decodes run, a request's tokens stay in order, void work is
dropped (pure, property-based)."""

from __future__ import annotations

import collections
import time

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from molink.messages import BatchEntry, NewRequest, StepPlan
from molink.sampling_params import SamplingParams
from molink.stage.inbox import ChunkSizer, StageInbox, split_fragment
from molink.transport.codec import PART_DECODE, PART_PREFILL, WireStep

HIDDEN = 4


class FixedSizer(ChunkSizer):
    """Cuts fragments to ``limit`` tokens (None: whole)."""

    def __init__(self, limit: int | None, factor: float = 1.0) -> None:
        super().__init__()
        self.factor, self.limit = factor, limit

    def __call__(self, fragment_tokens: int) -> int:
        return fragment_tokens if self.limit is None else min(self.limit, fragment_tokens)


def prefill(step_id: int, rid: str, start: int, num_tokens: int, epoch: int = 1,
            new: bool = False, sample: bool = False):
    plan = StepPlan(step_id, [BatchEntry(rid, start, num_tokens, sample)], freed_request_ids=["old"])
    if new:
        plan.new_requests.append(NewRequest(rid, list(range(start + num_tokens)),
                                            start + num_tokens, SamplingParams(), [0, 1]))
    hidden = torch.arange(start, start + num_tokens, dtype=torch.float32)[:, None].repeat(1, HIDDEN)
    step = WireStep(plan, None, stage_compute_s=(0.5,), step_num_tokens=num_tokens,
                    part=PART_PREFILL, epoch=epoch, stage_wait_s=(0.1,))
    return step, hidden, 0.0


def decode(step_id: int, rids: list[str], epoch: int = 1):
    plan = StepPlan(step_id, [BatchEntry(r, 100, 1, True) for r in rids])
    return WireStep(plan, None, step_num_tokens=len(rids), part=PART_DECODE, epoch=epoch), \
        torch.zeros(len(rids), HIDDEN), 0.0


def test_decodes_go_ahead_of_waiting_fragments_and_a_fragment_is_cut():
    inbox = StageInbox(FixedSizer(limit=4))
    inbox.put(prefill(1, "long", 0, 10, new=True))
    inbox.put(prefill(1, "long", 10, 10))
    inbox.put(decode(2, ["a", "b"]))
    taken = [inbox.get(), inbox.get()]
    inbox.put(decode(3, ["c"]))  # arrives while a piece of the prompt computes
    taken += [inbox.get() for _ in range(6)]
    kinds = [(s.plan.step_id, s.plan.num_tokens) for s, _, _ in taken]
    assert kinds == [(2, 2), (1, 4), (3, 1), (1, 4), (1, 2), (1, 4), (1, 4), (1, 2)]
    pieces = [(s, h) for s, h, _ in taken if s.plan.step_id == 1]
    first, rest = pieces[0][0], [s for s, _ in pieces[1:]]
    # metadata, freed ids and the earlier stages' timings go with the first piece only
    assert [r.request_id for r in first.plan.new_requests] == ["long"]
    assert first.plan.freed_request_ids == ["old"] and first.stage_compute_s == (0.5,)
    assert all(not s.plan.new_requests and s.stage_compute_s == (0.0,) for s in rest[:1])
    # every token once, in order, with its own activation rows
    starts = [(s.plan.batch[0].start, s.plan.num_tokens) for s, _ in pieces]
    assert starts == [(0, 4), (4, 4), (8, 2), (10, 4), (14, 4), (18, 2)]
    for step, hidden in pieces:
        entry = step.plan.batch[0]
        assert hidden[:, 0].tolist() == list(range(entry.start, entry.start + entry.num_tokens))
    assert inbox.num_pieces == 4


def test_without_a_bound_the_inbox_is_first_come_first_served():
    inbox = StageInbox(FixedSizer(limit=4, factor=0.0))
    inbox.put(prefill(1, "long", 0, 10))
    inbox.put(decode(2, ["a"]))
    assert [inbox.get()[0].plan.step_id for _ in range(2)] == [1, 2]


def test_fragments_of_an_older_route_and_before_a_reset_are_dropped():
    inbox = StageInbox(FixedSizer(limit=None))
    inbox.put(prefill(1, "x", 0, 8, epoch=1))
    inbox.put(decode(2, ["a"], epoch=2))  # a newer route: epoch 1's fragments are void
    inbox.put(prefill(3, "y", 0, 8, epoch=2))
    reset = object()
    inbox.put(reset)  # the head is gone: what is queued is void
    assert inbox.get()[0].plan.step_id == 2
    assert inbox.get() is reset


def test_split_fragment_keeps_a_cut_request_sampling_only_at_its_end():
    step, hidden, _ = prefill(1, "r", 0, 6, new=True, sample=True)
    (a, ha), (b, hb) = split_fragment(step, hidden, 4)
    assert [(e.start, e.num_tokens, e.sample) for e in a.plan.batch] == [(0, 4, False)]
    assert [(e.start, e.num_tokens, e.sample) for e in b.plan.batch] == [(4, 2, True)]
    assert ha.shape == (4, HIDDEN) and hb.shape == (2, HIDDEN)
    assert a.step_num_tokens == b.step_num_tokens == 6  # the last stage gathers by it


@settings(max_examples=150, deadline=None)
@given(events=st.lists(st.one_of(st.tuples(st.just("fragment"), st.integers(1, 40)),
                                 st.tuples(st.just("decode"), st.integers(1, 8)),
                                 st.just("compute")), max_size=60),
       limit=st.integers(1, 16))
def test_a_decode_waits_behind_at_most_one_piece_of_prefill(events, limit):
    """Fragments and decodes arrive in any interleaving with the compute thread's takes:
    a decode waits only for the piece being computed when it arrived (no piece is taken
    while it waits); no piece exceeds the bound; each prompt's tokens are computed once,
    in order."""
    inbox = StageInbox(FixedSizer(limit=limit))
    next_start: dict[str, int] = collections.defaultdict(int)
    computed: dict[str, list[int]] = collections.defaultdict(list)
    prefill_since: dict[int, int] = {}  # decode step id -> prefill pieces taken after it came
    step_id = 0

    def take() -> None:
        step, _, _ = inbox.get()
        if step.part == PART_DECODE:
            assert prefill_since.pop(step.plan.step_id) == 0
            return
        assert step.plan.num_tokens <= limit
        for entry in step.plan.batch:
            computed[entry.request_id] += list(range(entry.start, entry.start + entry.num_tokens))
        for key in prefill_since:
            prefill_since[key] += 1

    pending = 0
    for event in events:
        step_id += 1
        if event == "compute":
            if pending:
                take()
                pending -= 1
            continue
        kind, size = event
        if kind == "fragment":
            rid = f"r{step_id % 3}"
            inbox.put(prefill(step_id, rid, next_start[rid], size))
            next_start[rid] += size
            pending += -(-size // limit)
        else:
            inbox.put(decode(step_id, [f"d{i}" for i in range(size)]))
            prefill_since[step_id] = 0
            pending += 1
    while pending:
        take()
        pending -= 1
    assert not prefill_since
    for rid, tokens in computed.items():
        assert tokens == list(range(next_start[rid]))


def test_the_sizer_cuts_to_the_stages_own_bound_while_decodes_run():
    """Measured here: 2 ms + 0.25 ms per token, decode steps of 8 tokens; factor 1 allows
    a step of 2 * (2 + 8 * 0.25) = 8 ms, so prefill pieces of 16 tokens (8 + 8)."""
    sizer = ChunkSizer()
    sizer.factor = 1.0
    now = 100.0
    for i in range(20):
        sizer.record(decode(i, [f"d{j}" for j in range(8)])[0].plan, 0.002 + 8 * 0.00025,
                     now=now + 0.05 * i)
        sizer.record(prefill(100 + i, "p", 64 * i, 64)[0].plan, 0.002 + 64 * 0.00025,
                     now=now + 0.05 * i)
    assert sizer.decodes_running(now=now + 1.0)
    assert not sizer.decodes_running(now=now + 60.0)  # decodes stopped: prefill goes whole
    sizer._last_decode = time.monotonic()  # a decode just now (the sizer reads the clock)
    assert sizer(500) == 16
    sizer._last_decode = time.monotonic() - 60.0
    assert sizer(500) == 500
    sizer.factor = 0.0
    assert sizer(500) == 500
