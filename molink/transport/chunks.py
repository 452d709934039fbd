"""Cutting a step's activations along the token dimension (pure; no torch, no I/O).

A computed step leaves a stage as the activations of every token in its batch, rows in
batch order. For the link it is one *part*: a decode part (running requests' single
tokens only: small, latency-critical) or a prefill part (a step with prompt tokens, with
whatever decodes ride in it). The link scheduler sends a part whole or as consecutive token
ranges; each range travels as a self-contained chunk message the next stage can compute on
arrival::

    batch  [ b: decode | a: 3 prompt tokens | c: 4 prompt tokens ]     a prefill part
    range  [2:5] -> entries a(start+1, 2 tokens, samples), c(start, 1 token, no sample)

A step's decodes are not sent ahead of its prompt tokens: its result goes back to the head
only when every token of it is computed (``stage/gathering.py``), so its decodes would
arrive no earlier, and every next stage would compute the step in two passes, each
re-reading the stage's weights (measured: a receiving stage's prefill steps took 1.4x the
head's for the same tokens, 3 CPU stages of the 151M benchmark model). Decode-only steps,
other micro-batches', still overtake a prefill part on the link.

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

    plan: StepPlan  # the step: every entry of its batch, rows in batch order
    activations: RawTensor | None  # of the batch's tokens, rows in order; or None
    is_prefill: bool
    sent_metadata: set[str] = field(default_factory=set)  # requests whose metadata went
    sent_any: bool = False

    @property
    def num_tokens(self) -> int:
        return self.plan.num_tokens

    @property
    def bytes_per_token(self) -> int:
        """On the wire, per token: its activation row (and scale), or plan metadata only."""
        rows = self.activations
        return 64 if rows is None else max(1, rows.row_bytes + 4 * bool(rows.row_scales))


def step_part(plan: StepPlan, activations: RawTensor | None,
              is_prefill: bool | None = None) -> Part:
    """The step as one part: a decode part when every entry is a running request's single
    token, else a prefill part. A chunk that already is a part (``is_prefill`` known)
    stays a part of that kind, so a request's pieces never change queues (and never
    overtake each other) on later hops."""
    if is_prefill is None:
        is_prefill = len(decoding_ids(plan)) < len(plan.batch)
    return Part(plan, activations, is_prefill=is_prefill)


def decoding_ids(plan: StepPlan) -> list[str]:
    """The requests of ``plan`` whose entry is a running request's single token (a decode;
    a prompt piece of one token of a request already running counts too: it costs the
    same)."""
    new_ids = {r.request_id for r in plan.new_requests}
    return [e.request_id for e in plan.batch if e.num_tokens == 1 and e.request_id not in new_ids]


def cut_chunk(part: Part, start: int, end: int) -> tuple[StepPlan, RawTensor | None]:
    """Tokens ``[start, end)`` of ``part`` as a plan (with the metadata not yet sent) and
    their activation rows."""
    entries = slice_entries(part.plan.batch, start, end)
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
    return plan, take_rows(part.activations, start, end)


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


def take_rows(raw: RawTensor, start: int, end: int) -> RawTensor:
    """Rows ``[start, end)`` of a row-major tensor (the tensor itself when that is all)."""
    if (start, end) == (0, raw.shape[0]):
        return raw
    width = raw.row_bytes
    scales = raw.row_scales[start * 4:end * 4] if raw.row_scales else b""
    return RawTensor(data=raw.data[start * width:end * width], dtype=raw.dtype,
                     shape=(end - start, *raw.shape[1:]), row_scales=scales)
