"""StageCompute: one process's layers between two hops, from step in to activations out.

A stage and the head (whose own layers are the pipeline's first stage) take the same path
for every step::

    plan (+ hidden states) -> executor.execute -> timed -> activations -> wire encoding
                                                                          (compression named
                                                                           by the next hop)

``run`` is called on the compute thread, ``encode`` on the serializer thread (so the next
step's compute need not wait for the encoding); the caller hands the encoded activations
to its ``HopSender``. A small output (``small``: a decode step's activations, a last
stage's sampled tokens) is passed on from the compute thread itself: encoding it takes
microseconds, a hand-off to another thread 0.1-0.3 ms on a busy machine (measured on the
token's trip through 3 stages on 2 cores), once per hop of every token.
"""

from __future__ import annotations

import logging
import time

import torch

from molink.messages import RawTensor, StepOutput, StepPlan
from molink.runtime.wire_tensor import to_raw
from molink.transport.hop_sender import HopSender

logger = logging.getLogger(__name__)

SMALL_BYTES = 64 * 1024  # activations this size are encoded on the compute thread


def small(output: torch.Tensor | StepOutput | None) -> bool:
    """Whether ``output`` is cheaper to pass on from the compute thread than to hand over
    (activations of at most ``SMALL_BYTES``, sampled tokens, nothing)."""
    return not isinstance(output, torch.Tensor) or output.nbytes <= SMALL_BYTES


class StageCompute:
    def __init__(self, executor) -> None:
        self.executor = executor  # StageExecutor or EmulatedExecutor
        self.busy_since = 0.0  # when the current step started (monotonic); 0: idle
        self.num_steps_computed = 0

    def run(self, plan: StepPlan,
            hidden_states: torch.Tensor | None = None) -> tuple[torch.Tensor | StepOutput, float]:
        """-> (the step's activations [T, hidden], or the last stage's StepOutput; seconds).
        Raises what the executor raises."""
        self.busy_since = time.monotonic()
        start = time.perf_counter()
        try:
            output = self.executor.execute(plan, hidden_states)
        finally:
            self.busy_since = 0.0
        seconds = time.perf_counter() - start
        self.num_steps_computed += 1
        return output, seconds

    def busy_s(self) -> float:
        """How long the current step has been computing (0 when idle)."""
        busy_since = self.busy_since
        return time.monotonic() - busy_since if busy_since else 0.0

    def encode(self, activations: torch.Tensor, sender: HopSender) -> RawTensor:
        """``activations`` [T, hidden] in the wire format the next hop asks for now."""
        compression = sender.wire_compression(str(activations.dtype).removeprefix("torch."))
        return to_raw(activations, compression)

    def encode_or_error(self, output: torch.Tensor | None, error: str, sender: HopSender,
                        what: str) -> tuple[RawTensor | None, str]:
        """(``output`` encoded for ``sender``, ``error``); (None, why) when the step failed
        earlier or its encoding fails here: it goes on with the reason, as a failed compute
        does, and the thread encoding it (the compute thread, for a small one) lives on."""
        if error:
            return None, error
        try:
            return self.encode(output, sender), ""
        except Exception as exc:  # any failure: the step carries it on
            logger.exception("%s: its output could not be encoded", what)
            return None, f"{what}: its output could not be encoded: {type(exc).__name__}: {exc}"

    def encode_small(self, output: torch.Tensor | StepOutput,
                     sender: HopSender | None) -> RawTensor | None:
        """``output`` encoded now if it is small activations for ``sender``; else None."""
        if sender is None or not isinstance(output, torch.Tensor) or not small(output):
            return None
        return self.encode(output, sender)
