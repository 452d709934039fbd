"""A stage's inbox: decodes go ahead of waiting prefill fragments, a fragment is cut to the
stage's own stall bound while decodes run, a request's tokens stay in order, void work is
dropped (pure, property-based)."""

from __future__ import annotations

import collections
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from molink.messages import BatchEntry, NewRequest, StepPlan
from molink.sampling_params import SamplingParams
from molink.stage.inbox import ChunkSizer, StageInbox, continues, split_fragment
from molink.transport.codec import PART_DECODE, PART_PREFILL, WireStep

HIDDEN = 4


class FixedSizer(ChunkSizer):
    """Cuts fragments to ``limit`` tokens (None: whole)."""

    def __init__(self, limit: int | None, factor: float = 1.0) -> None:
        super().__init__()
        self.factor, self.limit = factor, limit

    def __call__(self, fragment_tokens: int, riding: int = 0) -> int:
        return fragment_tokens if self.limit is None else min(self.limit, fragment_tokens)


def prefill(step_id: int, rid: str, start: int, num_tokens: int, epoch: int = 1,
            new: bool = False, sample: bool = False, step_tokens: int | None = None,
            entries: list[BatchEntry] | None = None, compute_s: float = 0.5):
    """A prefill fragment: ``rid``'s tokens ``[start, start + num_tokens)`` (or ``entries``)
    of step ``step_id``, whose whole step has ``step_tokens`` tokens (default: this one's);
    activation row ``i`` holds the token's position."""
    entries = entries or [BatchEntry(rid, start, num_tokens, sample)]
    num_tokens = sum(e.num_tokens for e in entries)
    plan = StepPlan(step_id, entries, freed_request_ids=["old"])
    if new:
        plan.new_requests.append(NewRequest(rid, list(range(start + num_tokens)),
                                            start + num_tokens, SamplingParams(), [0, 1]))
    positions = [p for e in entries for p in range(e.start, e.start + e.num_tokens)]
    hidden = torch.tensor(positions, dtype=torch.float32)[:, None].repeat(1, HIDDEN)
    step = WireStep(plan, None, stage_compute_s=(compute_s,),
                    step_num_tokens=step_tokens or num_tokens, part=PART_PREFILL, epoch=epoch,
                    stage_wait_s=(0.1,))
    return step, hidden, 0.0


def decode(step_id: int, rids: list[str], epoch: int = 1):
    plan = StepPlan(step_id, [BatchEntry(r, 100, 1, True) for r in rids])
    return WireStep(plan, None, step_num_tokens=len(rids), part=PART_DECODE, epoch=epoch), \
        torch.zeros(len(rids), HIDDEN), 0.0


def test_decodes_go_ahead_of_waiting_fragments_and_a_fragment_is_cut():
    inbox = StageInbox(FixedSizer(limit=4))
    inbox.put(prefill(1, "long", 0, 10, new=True, step_tokens=20))
    inbox.put(prefill(1, "long", 10, 10, step_tokens=20, compute_s=0.0))
    inbox.put(decode(2, ["a", "b"]))
    taken = [inbox.get(), inbox.get()]
    inbox.put(decode(3, ["c"]))  # arrives while a piece of the prompt computes
    taken += [inbox.get() for _ in range(5)]
    assert len(inbox) == 0
    kinds = [(s.plan.step_id, s.plan.num_tokens) for s, _, _ in taken]
    # the two fragments of step 1 waited back to back: joined, then cut to the bound
    assert kinds == [(2, 2), (1, 4), (3, 1), (1, 4), (1, 4), (1, 4), (1, 4)]
    pieces = [(s, h) for s, h, _ in taken if s.plan.step_id == 1]
    first, rest = pieces[0][0], [s for s, _ in pieces[1:]]
    # metadata, freed ids and the earlier stages' timings go with the first piece only
    assert [r.request_id for r in first.plan.new_requests] == ["long"]
    assert first.plan.freed_request_ids == ["old"] and first.stage_compute_s == (0.5,)
    assert all(not s.plan.new_requests and s.stage_compute_s == (0.0,) for s in rest)
    # every token once, in order, with its own activation rows
    starts = [(s.plan.batch[0].start, s.plan.num_tokens) for s, _ in pieces]
    assert starts == [(0, 4), (4, 4), (8, 4), (12, 4), (16, 4)]
    for step, hidden in pieces:
        entry = step.plan.batch[0]
        assert hidden[:, 0].tolist() == list(range(entry.start, entry.start + entry.num_tokens))
    assert inbox.num_pieces == 4 and inbox.num_joined == 1


@pytest.mark.parametrize("factor", [1.0, 0.0])
def test_fragments_of_one_step_waiting_back_to_back_compute_as_one(factor):
    """Three fragments of a step of two prompts (``a`` cut between the first two, ``b``
    starting in the second), all queued before the compute thread takes one: one piece,
    ``a`` one entry sampling at its end, both new requests' metadata, the earlier stage's
    times summed; with or without a stall bound (factor 0: one FIFO queue)."""
    inbox = StageInbox(FixedSizer(limit=None, factor=factor))
    new_b = NewRequest("b", list(range(6)), 6, SamplingParams(), [2])
    first = prefill(7, "a", 0, 3, new=True, step_tokens=14, compute_s=0.25)
    second = prefill(7, "", 0, 0, step_tokens=14, compute_s=0.125, entries=[
        BatchEntry("a", 3, 5, True), BatchEntry("b", 0, 2, False)])
    second[0].plan.new_requests.append(new_b)
    third = prefill(7, "b", 2, 4, sample=True, step_tokens=14, compute_s=0.0)
    for fragment in (first, second, third):
        inbox.put(fragment)
    inbox.put(decode(8, ["c"]))
    step, hidden, _ = inbox.get()
    if factor > 0:  # the decode went first
        assert step.plan.step_id == 8
        step, hidden, _ = inbox.get()
    assert [(e.request_id, e.start, e.num_tokens, e.sample) for e in step.plan.batch] == [
        ("a", 0, 8, True), ("b", 0, 6, True)]
    assert [r.request_id for r in step.plan.new_requests] == ["a", "b"]
    assert step.plan.freed_request_ids == ["old"]
    assert step.stage_compute_s == (0.375,) and step.stage_wait_s == (0.30000000000000004,)
    assert hidden[:, 0].tolist() == [*range(8), *range(6)]
    assert inbox.num_joined == 2 and inbox.num_pieces == 0
    if factor == 0:
        assert inbox.get()[0].plan.step_id == 8
    assert len(inbox) == 0


def test_fragments_that_do_not_continue_one_another_stay_apart():
    """Another step, a gap in a request's tokens, a request in both, or a fragment that
    samples before its request's next tokens: computed one by one (and never across routes;
    the inbox drops an older route's fragments anyway)."""
    older, newer = prefill(1, "a", 0, 4, epoch=1), prefill(1, "a", 4, 4, epoch=2)
    assert not continues(*older[:2], *newer[:2])
    assert continues(*older[:2], *prefill(1, "a", 4, 4, epoch=1)[:2])
    unrelated = [
        (prefill(1, "a", 0, 4), prefill(2, "a", 4, 4)),  # another step
        (prefill(1, "a", 0, 4, step_tokens=12), prefill(1, "a", 6, 4, step_tokens=12)),
        (prefill(1, "a", 0, 4, step_tokens=9), prefill(1, "", 0, 0, step_tokens=9, entries=[
            BatchEntry("b", 0, 1, False), BatchEntry("a", 4, 4, False)])),
        (prefill(1, "a", 0, 4, sample=True, step_tokens=8),
         prefill(1, "a", 4, 4, step_tokens=8)),
    ]
    for first, second in unrelated:
        inbox = StageInbox(FixedSizer(limit=None))
        inbox.put(first)
        inbox.put(second)
        assert inbox.get()[0].plan.num_tokens == 4
        assert inbox.num_joined == 0 and len(inbox) == 1


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
@given(events=st.lists(st.one_of(st.tuples(st.just("fragment"), st.integers(1, 40),
                                           st.booleans()),
                                 st.tuples(st.just("decode"), st.integers(1, 8), st.just(False)),
                                 st.just("compute")), max_size=60),
       limit=st.integers(1, 16))
def test_a_decode_waits_behind_at_most_one_piece_of_prefill(events, limit):
    """Fragments (some continuing the previous fragment's step, so they may be joined) and
    decodes arrive in any interleaving with the compute thread's takes: a decode waits only
    for the piece being computed when it arrived (no piece is taken while it waits); no
    piece exceeds the bound; each prompt's tokens are computed once, in order."""
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

    fragment_step, rid = None, "r0"
    for event in events:
        step_id += 1
        if event == "compute":
            if len(inbox):
                take()
            continue
        kind, size, continued = event
        if kind == "fragment":
            if not continued or fragment_step is None:  # a new step, another request
                fragment_step, rid = step_id, f"r{step_id % 3}"
            inbox.put(prefill(fragment_step, rid, next_start[rid], size, step_tokens=10**6))
            next_start[rid] += size
        else:
            inbox.put(decode(step_id, [f"d{i}" for i in range(size)]))
            prefill_since[step_id] = 0
    while len(inbox):
        take()
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
    # a fragment carrying its step's 4 decodes: they ride on top of the allowance
    assert sizer(500, riding=4) == 16 + 4
    # 12 riding (more than the decode steps measured here): the head planned the prompt
    # beside 12 decodes, 1 * (8 + 12) = 20 prompt tokens, and the 12 decodes
    assert 20 + 12 - 1 <= sizer(500, riding=12) <= 20 + 12  # (the fit's float rounding)
    assert sizer(20, riding=4) == 20
    sizer._last_decode = time.monotonic() - 60.0
    assert sizer(500) == 500
    sizer._last_decode = time.monotonic()
    sizer.forget([f"d{j}" for j in range(8)])  # the streams ended (freed) just now
    assert not sizer.decodes_running() and sizer(500) == 500
    sizer.factor = 0.0
    assert sizer(500) == 500


def test_a_fragment_tells_the_sizer_the_decodes_riding_in_it():
    """A step's decodes travel in its prefill fragments: the sizer hears how many."""
    asked = []

    class Recording(FixedSizer):
        def __call__(self, fragment_tokens: int, riding: int = 0) -> int:
            asked.append((fragment_tokens, riding))
            return fragment_tokens

    inbox = StageInbox(Recording(limit=None))
    entries = [BatchEntry("d", 40, 1, True), BatchEntry("e", 41, 1, True),
               BatchEntry("p", 0, 10, True)]
    inbox.put(prefill(1, "p", 0, 0, new=True, entries=entries))
    step, _, _ = inbox.get()
    assert asked == [(12, 2)] and step.plan.batch == entries


def test_a_prompt_after_the_last_stream_ended_is_not_cut():
    """One stream decoded here and ended; the next request's prompt carries its free in its
    first fragment: no decode will come, so the prompt is computed whole (it was cut for
    half a second after the last decode, a second pass over the weights for nothing)."""
    sizer = ChunkSizer()
    sizer.factor = 2.0
    for i in range(12):
        sizer.record(decode(i, ["a"])[0].plan, 0.002 + 0.00025)
        sizer.record(prefill(100 + i, "p", 64 * i, 64)[0].plan, 0.002 + 64 * 0.00025)
    inbox = StageInbox(sizer)
    step, hidden, _ = prefill(200, "b", 0, 300, new=True)
    step.plan.freed_request_ids[:] = ["a"]
    inbox.put((step, hidden, 0.0))
    whole, _, _ = inbox.get()
    assert whole.plan.num_tokens == 300 and inbox.num_pieces == 0
    inbox.put(decode(300, ["b"]))  # b decodes now: a later prompt is cut again
    inbox.get()
    sizer.record(decode(300, ["b"])[0].plan, 0.002 + 0.00025)
    inbox.put(prefill(301, "c", 0, 300, new=True))
    first, _, _ = inbox.get()
    assert first.plan.num_tokens < 300 and inbox.num_pieces == 1
