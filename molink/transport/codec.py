"""Codec: plain messages <-> protobuf, validating everything that arrives.

Only protobuf parsing touches network bytes; tensors stay raw bytes with a dtype and a
shape whose sizes must agree. Anything malformed or out of bounds raises
``WireFormatError`` naming what is wrong; nothing is ever unpickled.
"""

from __future__ import annotations

import array
import math
from dataclasses import dataclass

from molink.messages import (
    BatchEntry,
    CachedRequest,
    LinkReport,
    NewRequest,
    RawTensor,
    StepOutput,
    StepPlan,
    TokenLogprobs,
)
from molink.sampling_params import SamplingParams, StructuredOutputsParams
from molink.transport import molink_pb2 as pb

# Bytes per element of every dtype allowed on the wire.
DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1, "int32": 4,
               "int64": 8}
MAX_MESSAGE_BYTES = 1 << 30  # gRPC limit on one message; prefill chunks stay far below
MAX_REQUEST_ID_CHARS = 256
MAX_TENSOR_DIMS = 4
MAX_EOS_IDS = 64
MAX_SENDER_ID_CHARS = 64


class WireFormatError(ValueError):
    """A message from the network is malformed or out of bounds."""


# ---- steps --------------------------------------------------------------------------------

PART_WHOLE, PART_DECODE, PART_PREFILL = 0, 1, 2  # StepMessage.part

@dataclass
class WireStep:
    """A decoded StepMessage."""

    plan: StepPlan
    hidden: RawTensor | None  # activations entering the receiving stage
    reset: bool = False  # drop all request state first
    error: str = ""  # an earlier stage failed this step
    stage_compute_s: tuple[float, ...] = ()  # compute time of each earlier stage
    step_num_tokens: int = 0  # tokens of the whole step (this message may carry a chunk)
    hops: tuple[LinkReport, ...] = ()  # every hop so far, measured by its sender
    probe: bool = False  # link measurement only
    part: int = PART_WHOLE  # PART_WHOLE | PART_DECODE | PART_PREFILL
    epoch: int = 0  # the route epoch the step was planned in
    sender_id: str = ""  # who sent it on this hop, and its number there (0: a probe)
    seq: int = 0
    stage_wait_s: tuple[float, ...] = ()  # arrival -> compute start, each earlier stage


def encode_step(plan: StepPlan, hidden: RawTensor | None = None, reset: bool = False,
                error: str = "", stage_compute_s: tuple[float, ...] = (),
                step_num_tokens: int | None = None,
                hops: tuple[LinkReport, ...] = (), part: int = PART_WHOLE,
                epoch: int = 0, stage_wait_s: tuple[float, ...] = ()) -> pb.StepMessage:
    msg = pb.StepMessage(step_id=plan.step_id, microbatch_id=plan.microbatch_id,
                         freed_request_ids=plan.freed_request_ids, reset=reset, error=error,
                         stage_compute_s=stage_compute_s, part=part, epoch=epoch,
                         stage_wait_s=stage_wait_s,
                         step_num_tokens=plan.num_tokens if step_num_tokens is None
                         else step_num_tokens)
    msg.hops.extend(encode_link(h) for h in hops)
    msg.batch.extend(pb.BatchEntry(request_id=e.request_id, start=e.start,
                                   num_tokens=e.num_tokens, sample=e.sample) for e in plan.batch)
    msg.new_requests.extend(_encode_new(r) for r in plan.new_requests)
    msg.cached_requests.extend(
        pb.CachedRequest(request_id=c.request_id, new_token_ids=c.new_token_ids,
                         new_block_ids=c.new_block_ids) for c in plan.cached_requests)
    if hidden is not None:
        msg.hidden_states.CopyFrom(encode_tensor(hidden))
    return msg


def decode_step(msg: pb.StepMessage) -> WireStep:
    batch = [BatchEntry(_request_id(e.request_id), _non_negative("start", e.start),
                        _positive("num_tokens", e.num_tokens), bool(e.sample)) for e in msg.batch]
    if len({e.request_id for e in batch}) != len(batch):
        raise WireFormatError("a request appears twice in one step")
    plan = StepPlan(
        step_id=msg.step_id, microbatch_id=msg.microbatch_id, batch=batch,
        new_requests=[_decode_new(r) for r in msg.new_requests],
        cached_requests=[CachedRequest(_request_id(c.request_id),
                                       _ids("new_token_ids", c.new_token_ids),
                                       _ids("new_block_ids", c.new_block_ids))
                         for c in msg.cached_requests],
        freed_request_ids=[_request_id(r) for r in msg.freed_request_ids],
    )
    hidden = decode_tensor(msg.hidden_states) if msg.HasField("hidden_states") else None
    if hidden is not None and (not hidden.shape or hidden.shape[0] != plan.num_tokens):
        raise WireFormatError(f"activations of shape {hidden.shape} do not match the "
                              f"{plan.num_tokens} tokens of the batch")
    if msg.step_num_tokens and msg.step_num_tokens < plan.num_tokens:
        raise WireFormatError(f"step_num_tokens {msg.step_num_tokens} is less than the "
                              f"{plan.num_tokens} tokens of this chunk")
    if msg.part not in (PART_WHOLE, PART_DECODE, PART_PREFILL):
        raise WireFormatError(f"unknown step part {msg.part}")
    return WireStep(plan, hidden, bool(msg.reset), msg.error[:4096],
                    _timings(msg.stage_compute_s), msg.step_num_tokens or plan.num_tokens,
                    _links(msg.hops), bool(msg.probe), msg.part, msg.epoch,
                    _sender_id(msg.sender_id), msg.seq, _timings(msg.stage_wait_s))


def _encode_new(request: NewRequest) -> pb.NewRequest:
    return pb.NewRequest(request_id=request.request_id, token_ids=request.token_ids,
                         num_prompt_tokens=request.num_prompt_tokens,
                         sampling=encode_sampling(request.sampling_params),
                         block_ids=request.block_ids, eos_token_ids=request.eos_token_ids)


def _decode_new(msg: pb.NewRequest) -> NewRequest:
    token_ids = _ids("token_ids", msg.token_ids)
    if not 0 < msg.num_prompt_tokens <= len(token_ids):
        raise WireFormatError(f"num_prompt_tokens {msg.num_prompt_tokens} does not fit "
                              f"{len(token_ids)} tokens")
    if len(msg.eos_token_ids) > MAX_EOS_IDS:
        raise WireFormatError(f"more than {MAX_EOS_IDS} end-of-sequence ids")
    return NewRequest(_request_id(msg.request_id), token_ids, msg.num_prompt_tokens,
                      decode_sampling(msg.sampling), _ids("block_ids", msg.block_ids),
                      tuple(_ids("eos_token_ids", msg.eos_token_ids)))


# ---- sampling parameters (what the last stage needs; stop strings stay on the head) -------

def encode_sampling(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, has_seed=params.seed is not None, seed=params.seed or 0,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, min_tokens=params.min_tokens,
        stop_token_ids=sorted(params.stop_token_id_set),
        has_logprobs=params.logprobs is not None, logprobs=params.logprobs or 0,
        has_prompt_logprobs=params.prompt_logprobs is not None,
        prompt_logprobs=params.prompt_logprobs or 0, ignore_eos=params.ignore_eos, logit_bias_token_ids=list(params.logit_bias or ()),
        logit_bias_values=list((params.logit_bias or {}).values()),
        structured_kind=params.structured_outputs.kind if params.structured_outputs else "",
        structured_spec=params.structured_outputs.spec if params.structured_outputs else "")


def decode_sampling(msg: pb.SamplingParams) -> SamplingParams:
    if len(msg.logit_bias_token_ids) != len(msg.logit_bias_values):
        raise WireFormatError("logit_bias: token ids and values differ in length")
    try:
        return SamplingParams(
            temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k, min_p=msg.min_p,
            seed=msg.seed if msg.has_seed else None, presence_penalty=msg.presence_penalty,
            frequency_penalty=msg.frequency_penalty, repetition_penalty=msg.repetition_penalty,
            min_tokens=msg.min_tokens, stop_token_ids=list(msg.stop_token_ids),
            logprobs=msg.logprobs if msg.has_logprobs else None, ignore_eos=msg.ignore_eos,
            prompt_logprobs=msg.prompt_logprobs if msg.has_prompt_logprobs else None,
            logit_bias=dict(zip(msg.logit_bias_token_ids, msg.logit_bias_values)) or None,
            max_tokens=None, structured_outputs=StructuredOutputsParams.from_wire(
                msg.structured_kind, msg.structured_spec) if msg.structured_kind else None)
    except ValueError as exc:
        raise WireFormatError(f"invalid sampling parameters: {exc}") from None


# ---- results --------------------------------------------------------------------------------

def encode_result(output: StepOutput, error: str = "",
                  stage_compute_s: tuple[float, ...] = (),
                  hops: tuple[LinkReport, ...] = (), epoch: int = 0,
                  stage_wait_s: tuple[float, ...] = ()) -> pb.StepResult:
    msg = pb.StepResult(step_id=output.step_id, microbatch_id=output.microbatch_id, error=error,
                        stage_compute_s=stage_compute_s, epoch=epoch,
                        stage_wait_s=stage_wait_s)
    msg.hops.extend(encode_link(h) for h in hops)
    for request_id, token in output.sampled_token_ids.items():
        msg.sampled_token_ids[request_id] = token
    for request_id, lp in output.logprobs.items():
        _encode_logprobs(msg.logprobs[request_id], lp)
    for request_id, positions in output.prompt_logprobs.items():
        entry = msg.prompt_logprobs[request_id]
        entry.positions.extend(positions)
        for lp in positions.values():
            _encode_logprobs(entry.tokens.add(), lp)
    return msg


def _encode_logprobs(entry: pb.TokenLogprobs, lp: TokenLogprobs) -> None:
    entry.token_id, entry.logprob, entry.rank = lp.token_id, lp.logprob, lp.rank
    entry.top_token_ids.extend(t for t, _ in lp.top)
    entry.top_logprobs.extend(v for _, v in lp.top)


def _decode_logprobs(lp: pb.TokenLogprobs) -> TokenLogprobs:
    if len(lp.top_token_ids) != len(lp.top_logprobs):
        raise WireFormatError("logprobs: token ids and values differ in length")
    return TokenLogprobs(lp.token_id, lp.logprob, lp.rank,
                         list(zip(lp.top_token_ids, lp.top_logprobs)))


@dataclass
class WireResult:
    """A decoded StepResult."""

    output: StepOutput
    error: str  # empty when the step succeeded
    stage_compute_s: tuple[float, ...]  # compute time of every stage, pipeline order
    hops: tuple[LinkReport, ...]  # every hop, pipeline order (the last: to the head)
    epoch: int = 0  # the route epoch of the step
    sender_id: str = ""  # the last stage's sender on its hop to the head, and the number
    seq: int = 0
    stage_wait_s: tuple[float, ...] = ()  # arrival -> compute start, every stage


def decode_result(msg: pb.StepResult) -> WireResult:
    output = StepOutput(step_id=msg.step_id, microbatch_id=msg.microbatch_id)
    for request_id, token in msg.sampled_token_ids.items():
        output.sampled_token_ids[_request_id(request_id)] = _non_negative("token id", token)
    for request_id, lp in msg.logprobs.items():
        output.logprobs[_request_id(request_id)] = _decode_logprobs(lp)
    for request_id, prompt in msg.prompt_logprobs.items():
        if len(prompt.positions) != len(prompt.tokens):
            raise WireFormatError("prompt logprobs: positions and tokens differ in length")
        output.prompt_logprobs[_request_id(request_id)] = {
            position: _decode_logprobs(lp) for position, lp in zip(prompt.positions,
                                                                   prompt.tokens)}
    return WireResult(output, msg.error[:4096], _timings(msg.stage_compute_s), _links(msg.hops),
                      msg.epoch, _sender_id(msg.sender_id), msg.seq, _timings(msg.stage_wait_s))


# ---- link reports -------------------------------------------------------------------------------

def encode_link(link: LinkReport) -> pb.HopLink:
    return pb.HopLink(bandwidth_bps=link.bandwidth_bps, latency_s=link.latency_s,
                      bytes_sent=link.bytes_sent, messages_sent=link.messages_sent,
                      tokens_sent=link.tokens_sent, compression=link.compression,
                      send_wait_s=link.send_wait_s)


def _links(values) -> tuple[LinkReport, ...]:
    if len(values) > MAX_STAGES + 1:
        raise WireFormatError("too many hop reports")
    links = []
    for h in values:
        if not (math.isfinite(h.bandwidth_bps) and math.isfinite(h.latency_s)
                and h.bandwidth_bps >= 0 and 0 <= h.latency_s < 3600 and len(h.compression) <= 16
                and 0 <= h.send_wait_s < 3600):
            raise WireFormatError("hop report out of range")
        links.append(LinkReport(h.bandwidth_bps, h.latency_s, h.bytes_sent, h.messages_sent,
                                h.tokens_sent, h.compression, h.send_wait_s))
    return tuple(links)


# ---- tensors ----------------------------------------------------------------------------------

def encode_tensor(tensor: RawTensor) -> pb.Tensor:
    return pb.Tensor(data=tensor.data, dtype=tensor.dtype, shape=list(tensor.shape),
                     row_scales=tensor.row_scales)


def decode_tensor(msg: pb.Tensor) -> RawTensor:
    if msg.dtype not in DTYPE_SIZES:
        raise WireFormatError(f"tensor dtype {msg.dtype!r} is not allowed "
                              f"(allowed: {', '.join(DTYPE_SIZES)})")
    shape = tuple(msg.shape)
    if len(shape) > MAX_TENSOR_DIMS or any(d < 0 for d in shape):
        raise WireFormatError(f"tensor shape {shape} is invalid")
    expected = math.prod(shape) * DTYPE_SIZES[msg.dtype]
    if expected != len(msg.data):
        raise WireFormatError(f"tensor of shape {shape} and dtype {msg.dtype} needs "
                              f"{expected} bytes, got {len(msg.data)}")
    if msg.row_scales:
        if msg.dtype != "int8" or len(shape) != 2 or len(msg.row_scales) != 4 * shape[0]:
            raise WireFormatError(f"row scales ({len(msg.row_scales)} bytes) do not fit an int8 "
                                  f"matrix of shape {shape}")
        if not all(math.isfinite(v) and v >= 0 for v in array.array("f", msg.row_scales)):
            raise WireFormatError("row scales must be finite and not negative")
    return RawTensor(data=msg.data, dtype=msg.dtype, shape=shape, row_scales=msg.row_scales)


# ---- field checks ---------------------------------------------------------------------------

MAX_STAGES = 256


def _timings(values) -> tuple[float, ...]:
    timings = tuple(values)
    if len(timings) > MAX_STAGES or any(not 0.0 <= t < 3600.0 for t in timings):
        raise WireFormatError("stage times are out of range")
    return timings


def _request_id(value: str) -> str:
    if not value or len(value) > MAX_REQUEST_ID_CHARS:
        raise WireFormatError("request id must be 1 to 256 characters")
    return value


def _sender_id(value: str) -> str:
    if len(value) > MAX_SENDER_ID_CHARS:
        raise WireFormatError(f"sender id longer than {MAX_SENDER_ID_CHARS} characters")
    return value


def _ids(name: str, values) -> list[int]:
    result = list(values)
    if any(v < 0 for v in result):
        raise WireFormatError(f"{name} must not be negative")
    return result


def _non_negative(name: str, value: int) -> int:
    if value < 0:
        raise WireFormatError(f"{name} must not be negative, got {value}")
    return value


def _positive(name: str, value: int) -> int:
    if value <= 0:
        raise WireFormatError(f"{name} must be positive, got {value}")
    return value
