"""Cutting a step's activations along the token dimension (pure; no torch, no I/O).

A computed step leaves a stage as the activations of every token in its batch, rows in
batch order. For the link it is split into *parts*: the decode part (one token per
request, latency-critical) and the prefill part (prompt tokens, large). The link scheduler
then sends a part whole or as consecutive token ranges; each range travels as a
self-contained chunk message the next stage can compute on arrival::

    batch  [ a: 3 prompt tokens | b: decode | c: 4 prompt tokens ]
    parts  decode: [ b ]                 prefill: [ a0 a1 a2 c0 c1 c2 c3 ]
    range  prefill[2:5] -> entries a(start+2, 1 token, samples), c(start, 2 tokens, no sample)

Per-request metadata (a new request's prompt and blocks, a running request's new blocks)
goes with the first chunk that holds the request; freed requests go with the first
chunk of each part (dropping a request twice is harmless).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from molink.messages import BatchEntry, RawTensor, StepPlan


@dataclass
class Part:
    """The tokens of one step that travel together as one link payload."""

    plan: StepPlan  # the step (its batch is not this part's; see ``entries``)
    entries: list[BatchEntry]  # this part's entries, in row order
    activations: RawTensor | None  # of exactly these entries' tokens, rows in order; or None
    is_prefill: bool
    sent_metadata: set[str] = field(default_factory=set)  # requests whose metadata went
    sent_any: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)

    @property
    def bytes_per_token(self) -> int:
        """On the wire, per token: its activation row (and scale), or plan metadata only."""
        rows = self.activations
        return 64 if rows is None else max(1, rows.row_bytes + 4 * bool(rows.row_scales))


def split_parts(plan: StepPlan, activations: RawTensor | None, *, separate_prefill: bool,
                is_prefill: bool | None = None) -> list[Part]:
    """The decode part (running requests' single tokens), then the prefill part (the rest);
    empty parts are left out. Without ``separate_prefill`` the step is one part. A chunk
    that already is one part (``is_prefill`` known) stays one part of that kind, so a
    request's pieces never change queues (and never overtake each other) on later hops."""
    if is_prefill is not None:
        return [Part(plan, list(plan.batch), activations, is_prefill=is_prefill)]
    new_ids = {r.request_id for r in plan.new_requests}
    is_decode = [e.num_tokens == 1 and e.request_id not in new_ids for e in plan.batch]
    if not separate_prefill or all(is_decode) or not any(is_decode):
        return [Part(plan, list(plan.batch), activations, is_prefill=not all(is_decode))]
    offsets = _offsets(plan.batch)
    parts = []
    for want_decode in (True, False):
        picked = [i for i, d in enumerate(is_decode) if d == want_decode]
        entries = [plan.batch[i] for i in picked]
        ranges = [(offsets[i], offsets[i] + plan.batch[i].num_tokens) for i in picked]
        picked_rows = None if activations is None else take_rows(activations, ranges)
        parts.append(Part(plan, entries, picked_rows, is_prefill=not want_decode))
    return parts


def cut_chunk(part: Part, start: int, end: int) -> tuple[StepPlan, RawTensor | None]:
    """Tokens ``[start, end)`` of ``part`` as a plan (with the metadata not yet sent) and
    their activation rows."""
    entries = slice_entries(part.entries, start, end)
    ids = {e.request_id for e in entries}
    fresh = ids - part.sent_metadata
    part.sent_metadata |= fresh
    plan = StepPlan(
        step_id=part.plan.step_id, microbatch_id=part.plan.microbatch_id, batch=entries,
        new_requests=[r for r in part.plan.new_requests if r.request_id in fresh],
        cached_requests=[c for c in part.plan.cached_requests if c.request_id in fresh],
        freed_request_ids=[] if part.sent_any else list(part.plan.freed_request_ids))
    part.sent_any = True
    if part.activations is None:
        return plan, None
    return plan, take_rows(part.activations, [(start, end)])


def slice_entries(entries: list[BatchEntry], start: int, end: int) -> list[BatchEntry]:
    """The entries covering flattened tokens ``[start, end)``; a cut entry samples only
    in its last piece."""
    out = []
    offset = 0
    for entry in entries:
        lo, hi = max(start, offset), min(end, offset + entry.num_tokens)
        if lo < hi:
            out.append(BatchEntry(entry.request_id, entry.start + lo - offset, hi - lo,
                                  entry.sample and hi == offset + entry.num_tokens))
        offset += entry.num_tokens
    return out


def take_rows(raw: RawTensor, ranges: list[tuple[int, int]]) -> RawTensor:
    """Rows ``ranges`` (half-open, in order) of a row-major tensor, concatenated."""
    if ranges == [(0, raw.shape[0])]:
        return raw
    width = raw.row_bytes
    data = b"".join(raw.data[a * width:b * width] for a, b in ranges)
    scales = b"".join(raw.row_scales[a * 4:b * 4] for a, b in ranges) if raw.row_scales else b""
    rows = sum(b - a for a, b in ranges)
    return RawTensor(data=data, dtype=raw.dtype, shape=(rows, *raw.shape[1:]), row_scales=scales)


def _offsets(entries: list[BatchEntry]) -> list[int]:
    offsets, total = [], 0
    for entry in entries:
        offsets.append(total)
        total += entry.num_tokens
    return offsets
