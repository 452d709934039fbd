"""StageCompute: one process's layers between two hops, from step in to activations out.

A stage and the head (whose own layers are the pipeline's first stage) take the same path
for every step::

    plan (+ hidden states) -> executor.execute -> timed -> activations -> wire encoding
                                                                          (compression named
                                                                           by the next hop)

``run`` is called on the compute thread, ``encode`` on the serializer thread (so the next
step's compute need not wait for the encoding); the caller hands the encoded activations
to its ``HopSender``.
"""

from __future__ import annotations

import time

import torch

from molink.messages import RawTensor, StepOutput, StepPlan
from molink.runtime.wire_tensor import to_raw
from molink.transport.hop_sender import HopSender


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
