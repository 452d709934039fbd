"""Cutting steps into parts and chunks keeps every token, row and piece of metadata."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from molink.messages import BatchEntry, CachedRequest, NewRequest, RawTensor, StepPlan
from molink.sampling_params import SamplingParams
from molink.transport.chunks import cut_chunk, slice_entries, split_parts, take_rows

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


def test_split_parts_puts_running_single_tokens_first_and_keeps_rows():
    plan = _plan()
    parts = split_parts(plan, _rows([0, 1, 2, 3, 4, 5, 6, 7, 8]), separate_prefill=True)
    decode, prefill = parts
    assert not decode.is_prefill and [e.request_id for e in decode.entries] == ["b", "d"]
    assert _row_values(decode.activations) == [3, 8]
    assert prefill.is_prefill and [e.request_id for e in prefill.entries] == ["a", "c"]
    assert _row_values(prefill.activations) == [0, 1, 2, 4, 5, 6, 7]
    whole = split_parts(plan, None, separate_prefill=False)
    assert len(whole) == 1 and whole[0].entries == plan.batch
    known = split_parts(plan, None, separate_prefill=True, is_prefill=True)
    assert len(known) == 1 and known[0].is_prefill  # a part stays one part on later hops


def test_chunks_carry_metadata_once_and_freed_ids_first():
    plan = _plan()
    _, prefill = split_parts(plan, _rows(list(range(9))), separate_prefill=True)
    first, rows = cut_chunk(prefill, 0, 2)
    assert first.batch == [BatchEntry("a", 0, 2, False)]  # cut: samples only in its last piece
    assert [r.request_id for r in first.new_requests] == ["a"] and first.freed_request_ids == ["gone"]
    assert _row_values(rows) == [0, 1]
    second, rows = cut_chunk(prefill, 2, 5)
    assert second.batch == [BatchEntry("a", 2, 1, True), BatchEntry("c", 4, 2, False)]
    assert second.new_requests == [] and [c.request_id for c in second.cached_requests] == ["c"]
    assert second.freed_request_ids == [] and _row_values(rows) == [2, 4, 5]
    third, rows = cut_chunk(prefill, 5, 7)
    assert third.batch == [BatchEntry("c", 6, 2, False)] and third.cached_requests == []
    assert _row_values(rows) == [6, 7]


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6), data=st.data())
def test_any_cut_covers_every_token_exactly_once(lengths, data):
    entries = [BatchEntry(f"r{i}", 10 * i, n, i % 2 == 0) for i, n in enumerate(lengths)]
    total = sum(lengths)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, total - 1), max_size=5))) if total > 1
                  else set())
    bounds = [0, *cuts, total]
    pieces = [slice_entries(entries, a, b) for a, b in zip(bounds, bounds[1:])]
    for (a, b), piece in zip(zip(bounds, bounds[1:]), pieces):
        assert sum(e.num_tokens for e in piece) == b - a
    for entry in entries:
        mine = [e for piece in pieces for e in piece if e.request_id == entry.request_id]
        assert mine[0].start == entry.start
        for before, after in zip(mine, mine[1:]):  # contiguous, in order
            assert after.start == before.start + before.num_tokens
        assert sum(e.num_tokens for e in mine) == entry.num_tokens
        assert [e.sample for e in mine] == [False] * (len(mine) - 1) + [entry.sample]
    rows = _rows([float(i) for i in range(total)])
    assert [v for a, b in zip(bounds, bounds[1:]) for v in _row_values(take_rows(rows, [(a, b)]))] \
        == list(range(total))


def test_take_rows_keeps_int8_row_scales():
    scales = struct.pack("<3f", 0.5, 1.5, 2.5)
    raw = RawTensor(data=bytes(range(6)), dtype="int8", shape=(3, 2), row_scales=scales)
    picked = take_rows(raw, [(0, 1), (2, 3)])
    assert picked.shape == (2, 2) and picked.data == bytes([0, 1, 4, 5])
    assert struct.unpack("<2f", picked.row_scales) == (0.5, 2.5)
