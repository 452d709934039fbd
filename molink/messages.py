"""Plain, torch-free data that crosses the scheduler/executor boundary.

The scheduler decides; executors run. A ``StepPlan`` says exactly what every executor must
compute in one step; a ``StepOutput`` is what the last stage sends back. Following vLLM v1,
a request's full data travels once (``NewRequest``) and afterwards only what changed
(``CachedRequest``), so executors keep per-request state between steps.

Positions in a plan (``BatchEntry``) are absolute token indices in the request::

    request tokens:  t0 t1 t2 t3 t4 t5 t6 t7
    computed KV:     [==========)                num_computed = start = 5
    this step:                   [=====)         num_tokens = 3  -> positions 5, 6, 7
    sample:          True iff start + num_tokens == number of known tokens
"""

from __future__ import annotations

from dataclasses import dataclass, field

from molink.sampling_params import SamplingParams


@dataclass
class NewRequest:
    """A request an executor has not seen (or dropped, e.g. after preemption)."""

    request_id: str
    token_ids: list[int]  # prompt + any output tokens already generated (resumed requests)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]  # the request's whole block table at this point
    # The head's end-of-sequence ids for this request (empty: the executor's own).
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class CachedRequest:
    """What changed for a request the executor already holds."""

    request_id: str
    new_token_ids: list[int]  # tokens sampled since the request was last scheduled
    new_block_ids: list[int]  # blocks appended to its block table


@dataclass
class BatchEntry:
    """One request's slice of work in a step."""

    request_id: str
    start: int  # first position computed this step (== tokens whose KV is already cached)
    num_tokens: int  # tokens computed this step
    sample: bool  # whether the last stage samples a token for this request


@dataclass
class StepPlan:
    step_id: int
    batch: list[BatchEntry]  # execution order; each request at most once
    new_requests: list[NewRequest] = field(default_factory=list)
    cached_requests: list[CachedRequest] = field(default_factory=list)
    # Requests whose executor-side state must be dropped before this step runs
    # (finished, aborted or preempted since the previous plan).
    freed_request_ids: list[str] = field(default_factory=list)
    microbatch_id: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(entry.num_tokens for entry in self.batch)

    @property
    def request_ids(self) -> list[str]:
        return [entry.request_id for entry in self.batch]


@dataclass
class TokenLogprobs:
    """Log-probabilities of one sampled token, from the model's raw distribution."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely token
    top: list[tuple[int, float]]  # the top-N (token id, logprob), most likely first


@dataclass
class StepOutput:
    step_id: int
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    microbatch_id: int = 0
    # requests asking for prompt logprobs: prompt position -> that prompt token's logprobs
    prompt_logprobs: dict[str, dict[int, TokenLogprobs]] = field(default_factory=dict)


# How activations may be encoded on a hop (``RawTensor.dtype`` after encoding follows).
# ``none`` carries the model's own dtype and is the only lossless one: a cast to the
# activations' own dtype is reported as ``none`` (see ``LinkMeter.wire_compression``), so
# every other name on a hop changes what the next stage computes with.
WIRE_COMPRESSIONS = ("none", "float16", "bfloat16", "int8")


def is_lossy(compression: str) -> bool:
    """Whether a hop's reported compression changes the activations it carries."""
    return compression not in ("none", "auto", "")


@dataclass
class RawTensor:
    """A tensor as it crosses the wire: raw C-order bytes, a dtype name and a shape."""

    data: bytes
    dtype: str  # "float32" | "bfloat16" | "float16" | "int8" | ...
    shape: tuple[int, ...]
    # Compressed activations (dtype "int8", 2-D): one float32 scale per row (per token);
    # value = int8 * scale. Empty for plain tensors.
    row_scales: bytes = b""

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the first dimension) of data."""
        return len(self.data) // self.shape[0] if self.shape and self.shape[0] else 0


@dataclass
class LinkReport:
    """One hop's link as its sender measured it (travels with steps to the head)."""

    bandwidth_bps: float = 0.0  # bits per second; 0: not measured yet
    latency_s: float = 0.0  # one way
    bytes_sent: int = 0
    messages_sent: int = 0
    tokens_sent: int = 0  # activation rows
    compression: str = "none"
    # Of the one message that carries this report: how long its step waited in the sender's
    # process between the end of its compute and its write (0 in a hop's running report).
    send_wait_s: float = 0.0
