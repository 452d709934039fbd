"""Where MoLink's time went, per stage and per hop, from the ``/metrics`` lines of a run.

Reads whatever of these the head exports (absent ones leave a dash):
``molink_stage_step_seconds_{sum,count}{kind, part, stage}`` (a step's compute, and its
wait for input), ``molink_hop_send_wait_seconds_{sum,count}{hop, kind}``,
``molink_hop_{bytes,tokens}_sent_total``, ``molink_hop_latency_seconds``,
``molink_hop_bandwidth_bits_per_second``.
"""

from __future__ import annotations

import re
from collections import defaultdict

_LINE = re.compile(r"^(\w+)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(lines: list[str]) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in lines:
        match = _LINE.match(line.strip())
        if match:
            name, labels, value = match.groups()
            samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def since(after: list[str], before: list[str]) -> list[str]:
    """``after`` less ``before`` for counters and summaries (what happened in between);
    gauges as ``after`` has them."""
    earlier = {(name, tuple(sorted(labels.items()))): value
               for name, labels, value in parse(before)}
    lines = []
    for name, labels, value in parse(after):
        if name.endswith(("_sum", "_count", "_total")):
            value -= earlier.get((name, tuple(sorted(labels.items()))), 0.0)
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")
    return lines


def _means_ms(samples, name: str, key: tuple[str, ...]) -> dict[tuple, tuple[int, float]]:
    """(labels in ``key`` order) -> (count, mean ms) of a ``name`` summary."""
    sums, counts = {}, {}
    for metric, labels, value in samples:
        if metric in (f"{name}_sum", f"{name}_count"):
            target = sums if metric.endswith("_sum") else counts
            target[tuple(labels.get(k, "") for k in key)] = value
    return {k: (int(counts[k]), 1e3 * sums[k] / counts[k]) for k in sums if counts.get(k)}


def stage_table(lines: list[str]) -> list[str]:
    samples = parse(lines)
    steps = _means_ms(samples, "molink_stage_step_seconds", ("stage", "kind", "part"))
    if not steps:
        return []
    by_stage = defaultdict(dict)
    for (stage, kind, part), (count, mean) in steps.items():
        by_stage[stage][kind, part] = (count, mean)
    rows = [("| stage | decode steps | decode compute (ms/step) | decode wait for input "
            "(ms/step) | prefill steps | prefill compute (ms/step) |"), "|---|---|---|---|---|---|"]
    for stage, parts in by_stage.items():
        decode = parts.get(("decode", "compute"), (0, float("nan")))
        wait = parts.get(("decode", "wait"), (0, float("nan")))
        prefill = parts.get(("prefill", "compute"), (0, float("nan")))
        rows.append(f"| {stage} | {decode[0]} | {decode[1]:.1f} | {wait[1]:.1f} | "
                    f"{prefill[0]} | {prefill[1]:.0f} |")
    return [*rows, ""]


def hop_table(lines: list[str]) -> list[str]:
    samples = parse(lines)
    by_hop = defaultdict(dict)
    for name, labels, value in samples:
        if "hop" in labels and name.startswith("molink_hop_") and "kind" not in labels:
            by_hop[labels["hop"]][name] = value
    waits = _means_ms(samples, "molink_hop_send_wait_seconds", ("hop", "kind"))
    if not by_hop:
        return []
    rows = [("| hop | bytes / token | send wait, decode (ms) | measured latency (ms) | "
            "measured bandwidth (Mbit/s) |"), "|---|---|---|---|---|"]
    for hop, values in by_hop.items():
        if "molink_hop_bytes_sent_total" not in values:
            continue  # e.g. the head's own activation count, not a link
        tokens = values.get("molink_hop_tokens_sent_total", 0)
        sent = values.get("molink_hop_bytes_sent_total", 0)
        per_token = f"{sent / tokens:.0f}" if tokens else "-"
        wait = waits.get((hop, "decode"), (0, float("nan")))[1]
        latency = 1e3 * values.get("molink_hop_latency_seconds", float("nan"))
        bandwidth = values.get("molink_hop_bandwidth_bits_per_second", float("nan")) / 1e6
        rows.append(f"| {hop} | {per_token} | {wait:.1f} | {latency:.1f} | {bandwidth:.0f} |")
    return [*rows, ""]
