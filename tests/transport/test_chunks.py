"""A step is one part, and cutting it into chunks keeps every token, row and piece of
metadata."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from molink.messages import BatchEntry, CachedRequest, NewRequest, RawTensor, StepPlan
from molink.sampling_params import SamplingParams
from molink.transport.chunks import cut_chunk, slice_entries, step_part, take_rows

WIDTH = 3  # float32 values per row


def _plan() -> StepPlan:
    params = SamplingParams(max_tokens=None)
    return StepPlan(
        step_id=7, microbatch_id=1,
        batch=[BatchEntry("a", 0, 3, True), BatchEntry("b", 5, 1, True),
               BatchEntry("c", 4, 4, False), BatchEntry("d", 2, 1, True)],
        new_requests=[NewRequest("a", [1, 2, 3], 3, params, [0])],
        cached_requests=[CachedRequest("b", [9], [4]), CachedRequest("c", [], []),
                         CachedRequest("d", [8], [])],
        freed_request_ids=["gone"])


def _rows(values: list[float]) -> RawTensor:
    data = b"".join(struct.pack("<3f", v, v, v) for v in values)
    return RawTensor(data=data, dtype="float32", shape=(len(values), WIDTH))


def _row_values(raw: RawTensor) -> list[float]:
    return [struct.unpack_from("<f", raw.data, i * raw.row_bytes)[0] for i in range(raw.shape[0])]


def test_a_step_is_one_part_whose_kind_its_tokens_decide():
    plan = _plan()  # a, c: prompt tokens; b, d: running requests' single tokens
    mixed = step_part(plan, _rows([0, 1, 2, 3, 4, 5, 6, 7, 8]))
    assert mixed.is_prefill and mixed.plan is plan  # decodes ride with the prompts
    assert mixed.num_tokens == 9
    assert _row_values(mixed.activations) == list(range(9))  # rows in batch order
    decodes = StepPlan(step_id=8, microbatch_id=0, batch=[plan.batch[1], plan.batch[3]],
                       cached_requests=plan.cached_requests)
    assert not step_part(decodes, _rows([3, 8])).is_prefill
    new_single = StepPlan(step_id=9, microbatch_id=0, batch=[BatchEntry("a", 0, 1, True)],
                          new_requests=plan.new_requests)
    assert step_part(new_single, None).is_prefill  # a one-token prompt is a prefill
    known = step_part(decodes, None, is_prefill=True)
    assert known.is_prefill  # a part stays a part of its kind on later hops


def test_chunks_carry_metadata_once_and_freed_ids_first():
    part = step_part(_plan(), _rows(list(range(9))))
    first, rows = cut_chunk(part, 0, 2)
    assert first.batch == [BatchEntry("a", 0, 2, False)]  # cut: samples only in its last piece
    assert [r.request_id for r in first.new_requests] == ["a"] and first.freed_request_ids == ["gone"]
    assert _row_values(rows) == [0, 1]
    second, rows = cut_chunk(part, 2, 6)
    assert second.batch == [BatchEntry("a", 2, 1, True), BatchEntry("b", 5, 1, True),
                            BatchEntry("c", 4, 2, False)]
    assert second.new_requests == [] and [c.request_id for c in second.cached_requests] == \
        ["b", "c"]
    assert second.freed_request_ids == [] and _row_values(rows) == [2, 3, 4, 5]
    third, rows = cut_chunk(part, 6, 9)
    assert third.batch == [BatchEntry("c", 6, 2, False), BatchEntry("d", 2, 1, True)]
    assert [c.request_id for c in third.cached_requests] == ["d"]
    assert _row_values(rows) == [6, 7, 8]


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6), data=st.data())
def test_any_cut_covers_every_token_exactly_once(lengths, data):
    entries = [BatchEntry(f"r{i}", 10 * i, n, i % 2 == 0) for i, n in enumerate(lengths)]
    total = sum(lengths)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, total - 1), max_size=5))) if total > 1
                  else set())
    bounds = [0, *cuts, total]
    pieces = [slice_entries(entries, a, b) for a, b in itertools.pairwise(bounds)]
    for (a, b), piece in zip(itertools.pairwise(bounds), pieces):
        assert sum(e.num_tokens for e in piece) == b - a
    for entry in entries:
        mine = [e for piece in pieces for e in piece if e.request_id == entry.request_id]
        assert mine[0].start == entry.start
        for before, after in itertools.pairwise(mine):  # contiguous, in order
            assert after.start == before.start + before.num_tokens
        assert sum(e.num_tokens for e in mine) == entry.num_tokens
        assert [e.sample for e in mine] == [False] * (len(mine) - 1) + [entry.sample]
    rows = _rows([float(i) for i in range(total)])
    assert [v for a, b in itertools.pairwise(bounds) for v in _row_values(take_rows(rows, a, b))] \
        == list(range(total))


def test_take_rows_keeps_int8_row_scales():
    scales = struct.pack("<3f", 0.5, 1.5, 2.5)
    raw = RawTensor(data=bytes(range(6)), dtype="int8", shape=(3, 2), row_scales=scales)
    picked = take_rows(raw, 1, 3)
    assert picked.shape == (2, 2) and picked.data == bytes([2, 3, 4, 5])
    assert struct.unpack("<2f", picked.row_scales) == (1.5, 2.5)
    assert take_rows(raw, 0, 3) is raw
