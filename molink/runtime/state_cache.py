"""StateCache: one stage's per-request recurrent state (state-space layers), held in slots.

The counterpart of the KV cache for layers that keep a fixed-size state per request instead
of per-token keys and values. Like KV block memory, state memory is local: each stage holds
the state of its own layers only. Unlike blocks, slots are not planned by the head: the
executor gives a request a slot when it first sees it (a ``NewRequest``) and takes it back
when the plan frees the request (finished, aborted or preempted). A preempted request comes
back as a ``NewRequest`` computed from position 0, which clears its slot's state, so the
state is rebuilt by recomputation exactly as KV is.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from molink.model.layers.state import StateLayer

logger = logging.getLogger(__name__)


def state_layers_of(model: nn.Module) -> list[StateLayer]:
    """The model's state layers in layer order; [] for models without any."""
    state_layers = getattr(model, "state_layers", None)
    return list(state_layers()) if state_layers is not None else []


class StateCache:
    """``num_slots`` slots of state for each layer in ``layers``, and the slot of each request."""

    def __init__(self, layers: list[StateLayer], num_slots: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        if num_slots <= 0:
            raise ValueError(f"the number of state slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self.tensors = [_allocate(layer, num_slots, dtype, device) for layer in layers]
        self._free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._slot_of: dict[str, int] = {}
        total = sum(t.numel() * t.element_size() for tensors in self.tensors for t in tensors)
        logger.info("state cache: %d slots for %d layers, %.1f MiB", num_slots, len(layers),
                    total / 2**20)

    def assign(self, request_id: str) -> int:
        """The request's slot, given now if it has none."""
        slot = self._slot_of.get(request_id)
        if slot is None:
            if not self._free_slots:
                raise RuntimeError(
                    f"no free state slot for request {request_id!r}: all {self.num_slots} are "
                    "in use (the head must not run more requests than max_num_seqs)")
            slot = self._slot_of[request_id] = self._free_slots.pop()
        return slot

    def free(self, request_id: str) -> None:
        """Take the request's slot back (a no-op if it has none)."""
        slot = self._slot_of.pop(request_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def slot_of(self, request_id: str) -> int:
        return self._slot_of[request_id]

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)


def _allocate(layer: StateLayer, num_slots: int, dtype: torch.dtype,
              device: torch.device) -> list[torch.Tensor]:
    """Allocate and bind one ``[num_slots, *spec.shape]`` tensor per state spec of ``layer``."""
    tensors = [torch.zeros(num_slots, *spec.shape, dtype=spec.dtype or dtype, device=device)
               for spec in layer.state_specs()]
    layer.state = tensors
    return tensors
