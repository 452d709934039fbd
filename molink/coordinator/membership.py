"""Membership: which node serves which layer range, and whether they tile the model.

Pure bookkeeping (no I/O): the head asks ``check_join`` before admitting a stage, so a
refusal always comes with the exact reason, and ``missing_ranges`` names what is not
served yet. Ranges are half-open ``[start, end)``.

Active stages (``stages``) tile the model with the head's own layers; standby stages
(``standbys``, ``molink join --standby``) hold a range loaded and wait: when layers are no
longer served, ``promote`` makes the standbys whose ranges fit the gap active, the one that
joined first first.
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
    cpu_set: str = ""  # the CPUs it may run on ("0-3,8"), "" where unknown
    threads: int = 0  # intra-op threads it computes with, 0 where unknown
    fingerprint: str = ""  # its TLS certificate ("" without TLS)
    node_id: str = ""  # random per stage process
    role: str = "active"  # "active" | "standby" | "draining" (leaving once its requests end)

    @property
    def label(self) -> str:
        return f"layers {self.start_layer}:{self.end_layer} at {self.address}"

    def overlaps(self, start: int, end: int) -> bool:
        return self.start_layer < end and start < self.end_layer


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
        self.stages: dict[str, StageMember] = {}  # active (and draining): the route
        self.standbys: dict[str, StageMember] = {}  # loaded, waiting to take over a range
        self._next_id = 1

    def check_join(self, start: int, end: int, address: str, fingerprint: str, dtype: str,
                   block_size: int, num_layers: int, standby: bool = False) -> str | None:
        """None if a stage with these properties may join, else the reason it may not (a
        standby may overlap served layers: it waits until they are not served)."""
        reason = self.check_identity(fingerprint, dtype, block_size, num_layers)
        if reason is not None:
            return reason
        ident = self.identity
        if not 0 <= start < end <= ident.num_layers:
            return f"layers {start}:{end} are outside the model's 0:{ident.num_layers}"
        if not address:
            return "the stage did not say where it can be reached (--advertise HOST:PORT)"
        if standby:
            return None
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

    def add(self, start: int, end: int, address: str, num_blocks: int,
            standby: bool = False) -> StageMember:
        member = StageMember(f"stage-{self._next_id}", start, end, address, num_blocks,
                             role="standby" if standby else "active")
        self._next_id += 1
        (self.standbys if standby else self.stages)[member.stage_id] = member
        return member

    def remove(self, stage_id: str) -> StageMember | None:
        return self.stages.pop(stage_id, None) or self.standbys.pop(stage_id, None)

    def get(self, stage_id: str) -> StageMember | None:
        return self.stages.get(stage_id) or self.standbys.get(stage_id)

    def all_members(self) -> list[StageMember]:
        """Active stages in pipeline order, then the standbys in the order they joined."""
        return [*self.ordered(), *self.standbys.values()]

    def can_replace(self, member: StageMember) -> bool:
        """Whether standbys would serve all of ``member``'s layers if it left now."""
        served = [r for owner, r in self._served() if owner != member.label]
        gaps = [(member.start_layer, member.end_layer)]
        for standby in self.standbys.values():
            if not any(standby.overlaps(a, b) for a, b in served):
                served.append((standby.start_layer, standby.end_layer))
                gaps = [piece for a, b in gaps for piece in _minus((a, b), standby)]
        return not gaps

    def promote(self) -> list[StageMember]:
        """Make active the standbys whose ranges lie in layers not served now (the first to
        join first); -> those promoted."""
        promoted = []
        for member in list(self.standbys.values()):
            if not any(member.overlaps(a, b) for _, (a, b) in self._served()):
                del self.standbys[member.stage_id]
                member.role = "active"
                self.stages[member.stage_id] = member
                promoted.append(member)
        return promoted

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


def _minus(span: tuple[int, int], member: StageMember) -> list[tuple[int, int]]:
    """``span`` less ``member``'s layers (zero, one or two pieces)."""
    a, b = span
    pieces = [(a, min(b, member.start_layer)), (max(a, member.end_layer), b)]
    return [(x, y) for x, y in pieces if x < y]
