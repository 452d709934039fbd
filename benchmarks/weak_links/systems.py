"""What is compared: the systems, the settings they run on, and how long a run may take."""

from __future__ import annotations

from dataclasses import dataclass

LINKS = ("1gbit:1ms", "100mbit:20ms", "20mbit:50ms")
STAGE_COUNTS = (2, 3, 4)
TARGET_LINK, TARGET_STAGES = "100mbit:20ms", 3
MIN_WINDOW_TOKENS = 4  # per request in the decode-heavy window: three gaps for its rate


@dataclass(frozen=True)
class System:
    key: str
    label: str
    microbatches: str  # "one" | "stages" | "auto" (the measured chooser) | a number
    link_schedule: str  # "molink" | "priority" | "fifo"
    compression: str  # "auto" (lossless: the model's dtype) | "int8" | ...
    # --decode-stall-factor (None: MoLink's default). The baselines run without the bound
    # (0): prompts are cut only to the step's token budget, as chunked prefill usually is.
    stall_factor: float | None = None

    def head_options(self, num_stages: int) -> dict:
        """HeadConfig keyword arguments that make the head run this system."""
        fixed = {"one": 1, "stages": num_stages, "auto": None}
        count = fixed[self.microbatches] if self.microbatches in fixed else int(self.microbatches)
        options = {"num_microbatches": count, "link_schedule": self.link_schedule,
                   "compression": self.compression}
        if self.stall_factor is not None:
            options["decode_stall_factor"] = self.stall_factor
        return options


NO_STALL_BOUND = 0.0

# Every system sends the model's own dtype (lossless) except the compression row, c-int8.
SYSTEMS = {s.key: s for s in (
    System("a", "(a) sequential", "one", "fifo", "auto", NO_STALL_BOUND),
    System("b", "(b) FIFO pipeline", "stages", "fifo", "auto", NO_STALL_BOUND),
    System("c", "(c) MoLink", "auto", "molink", "auto"),
    System("c-stages-mb", "(c) w/o measured micro-batching (= stages)", "stages", "molink", "auto"),
    System("c-priority", "(c) w/o just-in-time chunking (decode-first only)", "auto", "priority",
           "auto"),
    System("c-fifo", "(c) w/o link scheduling (FIFO)", "auto", "fifo", "auto"),
    System("c-no-stall", "(c) w/o the decode-stall bound", "auto", "molink", "auto",
           NO_STALL_BOUND),
    System("c-int8", "(c) + int8 activations (lossy)", "auto", "molink", "int8"),
)}
MAIN_SYSTEMS = ("a", "b", "c")
ABLATIONS = ("c-stages-mb", "c-priority", "c-fifo", "c-no-stall", "c-int8")


def fifo_with(count: int, key: str = "", label: str = "") -> System:
    """(b) with a given number of micro-batches in flight (for tuning it)."""
    return System(key or f"b{count}", label or f"(b) FIFO pipeline, {count} micro-batches",
                  str(count), "fifo", "auto", NO_STALL_BOUND)


@dataclass(frozen=True)
class Setting:
    regime: str  # "emulated" | "cpu"
    num_stages: int
    link: str

    @property
    def name(self) -> str:
        return f"{self.regime}, {self.num_stages} stages, {self.link}"

    @property
    def is_target(self) -> bool:
        return (self.link, self.num_stages) == (TARGET_LINK, TARGET_STAGES)


@dataclass(frozen=True)
class Job:
    """One pipeline start: a system on a setting, running some workloads in turn."""

    setting: Setting
    system: System
    workloads: tuple[str, ...]  # "decode" | "mixed"


@dataclass(frozen=True)
class Timing:
    """How long each part of a run may take (shorter in --quick)."""

    decode_window_s: float
    decode_window_max_s: float
    settle_s: float
    first_token_timeout_s: float
    mixed_requests: int
    mixed_drain_s: float
    mixed_output_cap: int
    min_window_tokens: int = MIN_WINDOW_TOKENS  # per request in a decode-heavy window
