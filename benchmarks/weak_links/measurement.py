"""What a run measures: request traces, per-run results, CPU time and bytes per token."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.weak_links.systems import Setting, System


@dataclass
class Trace:
    """One request as the client saw it."""

    prompt_len: int
    submitted: float = 0.0
    token_times: list[float] = field(default_factory=list)
    finished: bool = False
    error: str = ""


@dataclass
class RunResult:
    setting: Setting
    system: System
    workload: str
    ok: bool = True
    error: str = ""
    throughput: float = 0.0  # output tokens/s in the measured window
    window_s: float = 0.0
    ttft: tuple[float, float] | None = None  # p50, p99 seconds
    tpot: tuple[float, float] | None = None
    itl: tuple[float, float] | None = None  # gaps between a request's consecutive tokens
    e2e: tuple[float, float] | None = None
    num_requests: int = 0
    num_unfinished: int = 0
    mean_context: float = 0.0  # tokens of context per decode token, mid-window
    hop_bytes_per_token: list[float] = field(default_factory=list)  # relay-counted, per link
    library_hops: list[str] = field(default_factory=list)  # head.hop_stats(), described
    num_microbatches: str = ""
    stage_step_ms: list[float] = field(default_factory=list)  # per stage, decode steps in window
    num_rounds: int = 0  # decode steps in the window (each request's token count is in traces)
    cpu_percent: dict[str, float] = field(default_factory=dict)  # % of one core in the window
    notes: list[str] = field(default_factory=list)


def percentiles(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        low = math.floor(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return at(0.5), at(0.99)


@dataclass(frozen=True)
class LinkSample:
    """One moment of every emulated link, pipeline order: bytes that crossed its relay in
    the data direction, and tokens the library sent on it (head.hop_stats())."""

    relay_bytes: list[int]
    hop_tokens: list[int]


def machine_busy_seconds(cpus: frozenset[int] = frozenset()) -> float:
    """CPU seconds every process on this machine has used (Linux /proc/stat; 0 elsewhere);
    ``cpus``: on those CPUs only."""
    names = {f"cpu{n}" for n in cpus} or {"cpu"}
    try:
        busy = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name in names:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
                busy += user + nice + system + irq + softirq + steal
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def bytes_per_token(samples: list[LinkSample], fallback_tokens: int) -> list[float]:
    """Per link: relay-counted bytes / tokens the library sent on it, between two samples
    taken while the link was idle, so that no message is half counted (with one
    micro-batch a round's bytes arrive in one burst); the window's ends when the link never
    idled. ``fallback_tokens`` when the library counted no token on a link."""
    return [_link_bytes_per_token(samples, j, fallback_tokens)
            for j in range(len(samples[0].relay_bytes))]


def _link_bytes_per_token(samples: list[LinkSample], j: int, fallback_tokens: int) -> float:
    first, last = samples[0], samples[-1]
    # Idle: neither bytes (the relay's count lags up to 50 ms) nor tokens (counted when
    # sent) moved between two samples 100 ms apart.
    idle = [k for k in range(1, len(samples))
            if samples[k].relay_bytes[j] == samples[k - 1].relay_bytes[j]
            and samples[k].hop_tokens[j:j + 1] == samples[k - 1].hop_tokens[j:j + 1]]
    if len(idle) >= 2:
        a, b = samples[idle[0]], samples[idle[-1]]
        if b.hop_tokens[j:j + 1] > a.hop_tokens[j:j + 1]:
            first, last = a, b
    tokens = fallback_tokens
    if j < len(first.hop_tokens) and j < len(last.hop_tokens):
        tokens = last.hop_tokens[j] - first.hop_tokens[j] or fallback_tokens
    return (last.relay_bytes[j] - first.relay_bytes[j]) / tokens if tokens else 0.0


def cpu_percent(before: dict, after: dict, window_s: float) -> dict[str, float]:
    """% of one core per component over the window; "other": processes not of this run."""
    used = {k: 100 * (after[k] - before[k]) / window_s for k in before}
    used["other"] = max(0.0, used.pop("machine") - sum(used.values()))
    return used
