"""Membership: which node serves which layer range, and whether they tile the model.

Pure bookkeeping (no I/O): the head asks ``check_join`` before admitting a stage, so a
refusal always comes with the exact reason, and ``missing_ranges`` names what is not
served yet. Ranges are half-open ``[start, end)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageMember:
    stage_id: str
    start_layer: int
    end_layer: int
    address: str
    num_blocks: int
    consecutive_health_failures: int = 0
    extra: dict = field(default_factory=dict)
    host_id: str = ""  # which machine (stages on one machine share its cores)
    device: str = ""  # "cpu", "cuda", "emulated", ...
    cpu_cores: int = 0
    fingerprint: str = ""  # its TLS certificate ("" without TLS)

    @property
    def label(self) -> str:
        return f"layers {self.start_layer}:{self.end_layer} at {self.address}"


@dataclass(frozen=True)
class ModelIdentity:
    """What every stage must agree on with the head."""

    fingerprint: str
    dtype: str
    block_size: int
    num_layers: int


class Membership:
    def __init__(self, identity: ModelIdentity, head_range: tuple[int, int] | None) -> None:
        self.identity = identity
        self.head_range = head_range  # layers computed by the head itself, if any
        self.stages: dict[str, StageMember] = {}
        self._next_id = 1

    def check_join(self, start: int, end: int, address: str, fingerprint: str, dtype: str,
                   block_size: int, num_layers: int) -> str | None:
        """None if a stage with these properties may join, else the reason it may not."""
        reason = self.check_identity(fingerprint, dtype, block_size, num_layers)
        if reason is not None:
            return reason
        ident = self.identity
        if not 0 <= start < end <= ident.num_layers:
            return f"layers {start}:{end} are outside the model's 0:{ident.num_layers}"
        if not address:
            return "the stage did not say where it can be reached (--advertise HOST:PORT)"
        for owner, (a, b) in self._served():
            if start < b and a < end:
                return f"layers {start}:{end} overlap layers {a}:{b} already served by {owner}"
        return None

    def check_identity(self, fingerprint: str, dtype: str, block_size: int,
                       num_layers: int) -> str | None:
        """None if a stage loads the head's model in the head's dtype and block size."""
        ident = self.identity
        if fingerprint != ident.fingerprint:
            return (f"model mismatch: the stage's config.json differs from the head's "
                    f"(fingerprint {fingerprint[:12]} vs {ident.fingerprint[:12]}); "
                    "every node must load the same model")
        if num_layers != ident.num_layers:
            return f"model mismatch: the stage's model has {num_layers} layers, the head's {ident.num_layers}"
        if dtype != ident.dtype:
            return f"dtype mismatch: the stage runs {dtype}, the head {ident.dtype}; pass --dtype {ident.dtype}"
        if block_size != ident.block_size:
            return (f"block size mismatch: the stage uses {block_size}-token KV blocks, "
                    f"the head {ident.block_size}")
        return None

    def add(self, start: int, end: int, address: str, num_blocks: int) -> StageMember:
        member = StageMember(f"stage-{self._next_id}", start, end, address, num_blocks)
        self._next_id += 1
        self.stages[member.stage_id] = member
        return member

    def remove(self, stage_id: str) -> StageMember | None:
        return self.stages.pop(stage_id, None)

    def ordered(self) -> list[StageMember]:
        """Joined stages in pipeline order."""
        return sorted(self.stages.values(), key=lambda m: m.start_layer)

    def missing_ranges(self) -> list[tuple[int, int]]:
        covered = sorted(r for _, r in self._served())
        missing, cursor = [], 0
        for a, b in covered:
            if a > cursor:
                missing.append((cursor, a))
            cursor = max(cursor, b)
        if cursor < self.identity.num_layers:
            missing.append((cursor, self.identity.num_layers))
        return missing

    @property
    def complete(self) -> bool:
        return not self.missing_ranges()

    def describe_missing(self) -> str:
        return ", ".join(f"{a}:{b}" for a, b in self.missing_ranges())

    def _served(self) -> list[tuple[str, tuple[int, int]]]:
        served = [(m.label, (m.start_layer, m.end_layer)) for m in self.stages.values()]
        if self.head_range is not None:
            served.append(("the head", self.head_range))
        return served
