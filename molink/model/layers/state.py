"""Per-request recurrent state: what state-space layers keep instead of a KV cache.

A state layer (a Mamba mixer) summarises a request's whole past in fixed-size tensors, so
its memory per request does not grow with the context. Each stage holds the state of its
own layers only, in *slots*: row ``slot`` of every state tensor belongs to one request::

    state tensor of one layer: [num_slots, *spec.shape]
    request "a" -> slot 2, "b" -> slot 0   (assigned by the runtime, freed with the request)

The layer declares what it needs (``state_specs``); the runtime allocates the tensors and
binds them to ``layer.state``, as it binds KV caches to attention layers. A step's
``StateMetadata`` says, per batch entry, which slot to read and update and whether the entry
starts the request at position 0, in which case the slot is cleared first (a new request,
or one preempted and now recomputed from scratch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StateSpec:
    """One state tensor of a layer, per slot."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None = None  # None: the model's dtype


@dataclass
class StateMetadata:
    """Per batch entry of a step, in plan order (the order of the flat token rows)."""

    slots: list[int]  # state slot of the entry's request on this stage
    row_ranges: list[tuple[int, int]]  # rows [lo, hi) of the entry in the flat [T, ...] tensors
    resets: list[bool]  # True: the entry starts at position 0, clear its slot first


class StateLayer(nn.Module):
    """Base of layers that keep a fixed-size recurrent state per request."""

    def __init__(self) -> None:
        super().__init__()
        # Bound by the runtime: one [num_slots, *spec.shape] tensor per spec, in spec order.
        self.state: list[torch.Tensor] | None = None

    def state_specs(self) -> list[StateSpec]:
        raise NotImplementedError
