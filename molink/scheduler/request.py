"""Request: one prompt's state as the head's scheduler sees it.

A request's tokens are its prompt followed by the tokens sampled so far::

    all_token_ids:  p0 p1 p2 p3 | o0 o1
    computed KV:    [=========)              num_computed_tokens = 4
    next step:                  [====)       positions 4, 5 (sample: 4 + 2 == num_tokens)

Only the scheduler changes a request's fields; everyone else reads them.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Container

from molink.messages import CachedRequest, NewRequest
from molink.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED})

# finish_reason (OpenAI wording) <-> final status.
FINISH_REASON_TO_STATUS = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
    "abort": RequestStatus.FINISHED_ABORTED,
}


def check_prompt_length(num_prompt_tokens: int, max_model_len: int) -> None:
    """The one rule for a prompt's length (ValueError naming ``prompt``): it is not empty and
    leaves room for at least one generated token within ``max_model_len``."""
    if num_prompt_tokens == 0:
        raise ValueError("prompt must not be empty")
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"prompt is {num_prompt_tokens} tokens long, but the model length (max_model_len) "
            f"is {max_model_len}: the prompt must be shorter than that")


class Request:
    """A prompt, its sampled tokens, its KV blocks and where it stands in the scheduler."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time

        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0  # tokens whose KV is cached (or being computed in flight)
        self.status = RequestStatus.WAITING
        self.block_ids: list[int] = []
        self.in_flight = False  # scheduled in a plan whose output has not returned yet
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None  # stop token id or stop string
        self.num_preemptions = 0
        self.num_replays = 0  # times its KV was lost with a stage and rebuilt (requeue_all)

        # Scheduler bookkeeping: FCFS order and what the executors already hold.
        self.arrival_index = -1  # set by Scheduler.add_request
        self.known_to_executors = False  # sent since the last reset (start, preemption)
        self.num_tokens_sent = 0  # all_token_ids[:num_tokens_sent] are held by executors
        self.num_blocks_sent = 0  # block_ids[:num_blocks_sent] are held by executors

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_decoding(self) -> bool:
        """Past its prefill: it has generated a token and has at most one left to compute
        (a resumed request recomputes its outputs first: prefill again)."""
        return bool(self.output_token_ids) and self.num_tokens - self.num_computed_tokens <= 1

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def __repr__(self) -> str:
        # Never the prompt itself: reprs end up in logs.
        return (f"Request(id={self.request_id!r}, status={self.status.name}, "
                f"num_tokens={self.num_tokens}, num_computed={self.num_computed_tokens}, "
                f"in_flight={self.in_flight})")


def check_new_request(request: Request, in_use: Container[str], max_model_len: int,
                      num_blocks: int, block_size: int) -> None:
    """ValueError unless ``request`` may be queued: a fresh request with an unused id whose
    prompt fits the model and, with one generated token, the whole KV cache."""
    if not isinstance(request.request_id, str) or not request.request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request.request_id!r}")
    if request.request_id in in_use:
        raise ValueError(f"request_id {request.request_id!r} is already in use")
    if request.status is not RequestStatus.WAITING or request.output_token_ids:
        raise ValueError(f"request {request.request_id!r} was already scheduled")
    num_prompt = request.num_prompt_tokens
    check_prompt_length(num_prompt, max_model_len)
    if -(-(num_prompt + 1) // block_size) > num_blocks:
        raise ValueError(
            f"prompt_token_ids has {num_prompt} tokens, more than the KV cache can ever hold "
            f"({num_blocks} blocks of {block_size} tokens)")


def new_request_message(request: Request) -> NewRequest:
    """What the executors get the first time ``request`` runs (after a reset: again)."""
    request.known_to_executors = True
    return NewRequest(request.request_id, request.all_token_ids, request.num_prompt_tokens,
                      request.sampling_params, list(request.block_ids),
                      tuple(sorted(request.eos_token_ids)))


def cached_request_message(request: Request) -> CachedRequest:
    """What the executors lack of a request they hold: its new tokens and blocks."""
    # Executors hold all_token_ids[:num_tokens_sent]; that always covers the prompt.
    first_new_output = request.num_tokens_sent - request.num_prompt_tokens
    assert first_new_output >= 0, request
    return CachedRequest(request.request_id, request.output_token_ids[first_new_output:],
                         request.block_ids[request.num_blocks_sent:])


def stop_condition(request: Request, token_id: int, max_len: int) -> tuple[str, int | None] | None:
    """(finish_reason, stop_reason) if ``token_id`` (just appended) ends ``request``, else
    None. ``max_len``: the most tokens a request may hold."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        if token_id in params.stop_token_id_set:
            return "stop", token_id
        if token_id in request.eos_token_ids and not params.ignore_eos:
            return "stop", None
    if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
        return "length", None
    if request.num_tokens >= max_len:
        return "length", None
    return None
