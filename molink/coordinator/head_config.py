"""HeadConfig: how the head runs its pipeline, validated once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from molink.scheduler.placement import DEFAULT_HEADROOM
from molink.scheduler.stall_bound import DEFAULT_STALL_FACTOR
from molink.transport.hop_sender import COMPRESSIONS, SCHEDULES


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The head's own options (the model, cache and scheduler have their own configs)."""

    head_layers: tuple[int, int] | None  # layers the head computes itself; None: none
    num_microbatches: int | None = None  # plans in flight; None: auto (measured)
    link_schedule: str = "molink"  # how every hop sends: molink | priority | fifo
    compression: str = "auto"  # activations on the wire: auto | none | float16 | ...
    max_chunk_tokens: int | None = None  # cap on a prefill chunk (None: just in time)
    # While requests decode, a step carrying prompt tokens takes at most (1 + this) decode
    # steps, at the head and every stage (scheduler.stall_bound); 0: no bound.
    decode_stall_factor: float = DEFAULT_STALL_FACTOR
    # Automatic placement (stages joining without --layers; the head too with auto_layers).
    auto_layers: bool = False  # the head takes the first range the plan gives it
    placement_settle_s: float = 10.0  # wait this long after the last new node, then plan
    placement_headroom: float = DEFAULT_HEADROOM  # of each node's memory left unplanned
    max_memory: int | None = None  # what the head offers (None: measured on its device)
    gpu_memory_utilization: float | None = None
    fetch_layers: Callable[[int, int], str] | None = None  # a Hub model: fetch a range's shards
    # A lost stage: requests wait this long for a standby or a new join to take over its
    # layers, then are replayed; 0: they fail at once.
    failover_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.link_schedule not in SCHEDULES:
            raise ValueError(f"link_schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {self.link_schedule!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, "
                             f"got {self.compression!r}")
        if self.num_microbatches is not None and self.num_microbatches < 1:
            raise ValueError(f"num_microbatches must be at least 1, got {self.num_microbatches}")
        if not 0 <= self.decode_stall_factor < float("inf"):
            raise ValueError(f"decode_stall_factor must be >= 0, got {self.decode_stall_factor}")
        if self.max_chunk_tokens is not None and self.max_chunk_tokens < 1:
            raise ValueError(f"max_chunk_tokens must be at least 1, got {self.max_chunk_tokens}")
        if self.auto_layers and self.head_layers is not None:
            raise ValueError("auto_layers and head_layers exclude each other")
        if self.placement_settle_s < 0 or not 0 <= self.placement_headroom < 1:
            raise ValueError("placement_settle_s must be >= 0 and placement_headroom in [0, 1)")
        if not 0 <= self.failover_timeout_s < float("inf"):
            raise ValueError(f"failover_timeout_s must be a number of seconds >= 0, "
                             f"got {self.failover_timeout_s}")
        if self.head_layers is not None and not 0 <= self.head_layers[0] < self.head_layers[1]:
            raise ValueError(f"head_layers must be a non-empty range START:END, "
                             f"got {self.head_layers}")
