"""``molink status --head HOST:PORT``: the live pipeline and its figures, from the head's API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

TIMEOUT_S = 5.0


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(f"cannot reach the head at {url}: {exc}") from None


def render(head: str) -> str:
    base = head if head.startswith("http") else f"http://{head}"
    status, body = fetch(f"{base}/health")
    health = json.loads(body) if body.startswith("{") else {}
    lines = []
    if status == 200:
        lines.append(f"ready: {health.get('pipeline', '')}")
    else:
        lines.append(f"NOT READY: {health.get('error', {}).get('message', body.strip())}")
    _, metrics_text = fetch(f"{base}/metrics")
    samples = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    compute = {labels.get("stage", "?"): seconds
               for labels, seconds in samples.get("molink_stage_compute_seconds", [])}
    roles = {labels.get("stage", "?"): labels.get("role", "")
             for labels, _ in samples.get("molink_stage_role", [])}
    for stage in [*compute, *(s for s in roles if s not in compute)]:
        timing = f"{compute[stage] * 1e3:8.1f} ms/step" if stage in compute else f"{'-':>16}"
        lines.append(f"  {stage:<48} {timing}  {roles.get(stage, 'active')}")
    for name, title in (("molink_running_requests", "running requests"),
                        ("molink_queue_length", "waiting requests"),
                        ("molink_kv_blocks_used", "KV blocks used"),
                        ("molink_kv_blocks_free", "KV blocks free"),
                        ("molink_microbatches_in_flight", "micro-batches in flight"),
                        ("molink_generated_tokens_total", "tokens generated"),
                        ("molink_failovers_total", "failovers"),
                        ("molink_requests_replayed_total", "requests replayed"),
                        ("molink_hop_activation_bytes_sent", "activation bytes sent by the head")):
        for _, value in samples.get(name, []):
            lines.append(f"  {title:<48} {value:,.0f}")
    lines.extend(_hop_lines(samples))
    lines.extend(_breakdown_lines(samples))
    return "\n".join(lines)


def _breakdown_lines(samples: dict[str, list[tuple[dict, float]]]) -> list[str]:
    """A decode step's trip, mean ms per step since the route was set up: each stage's wait
    and compute, the wire (all hops), the head and the round trip (each hop's send wait is
    in the hop table)."""
    step = _decode_mean_ms(samples, "molink_step_seconds")
    if not step:
        return []
    waits = _decode_mean_ms(samples, "molink_stage_step_seconds", part="wait")
    rows = [("decode step", "wait", "compute")]
    rows += [(stage, f"{waits.get(stage, 0.0):.2f} ms", f"{compute:.2f} ms")
             for stage, compute in _decode_mean_ms(samples, "molink_stage_step_seconds",
                                                   part="compute").items()]
    steps = next((value for labels, value in samples.get("molink_step_seconds_count", [])
                  if labels.get("kind") == "decode"), 0.0)
    summary = (f"  wire (all hops) {step.get('wire', 0.0):.2f} ms, head "
               f"{step.get('head', 0.0):.2f} ms, round trip {step.get('round_trip', 0.0):.2f} "
               f"ms (mean of {steps:,.0f} decode steps)")
    return [*_table(rows), summary]


def _decode_mean_ms(samples: dict[str, list[tuple[dict, float]]], name: str,
                    **match: str) -> dict[str, float]:
    """Mean ms per decode step of summary ``name``, by stage, hop or part."""
    sums, counts = {}, {}
    for suffix, into in (("_sum", sums), ("_count", counts)):
        for labels, value in samples.get(name + suffix, []):
            if labels.get("kind") == "decode" and all(labels.get(k) == v
                                                      for k, v in match.items()):
                into[labels.get("stage") or labels.get("hop") or labels.get("part")] = value
    return {key: 1e3 * sums[key] / counts[key] for key in sums if counts.get(key)}


def _hop_lines(samples: dict[str, list[tuple[dict, float]]]) -> list[str]:
    """A table with one row per hop, in the order the head reports them (pipeline order)."""
    def by_hop(name: str) -> dict[str, float]:
        return {labels.get("hop", "?"): value for labels, value in samples.get(name, [])}

    bytes_sent = by_hop("molink_hop_bytes_sent_total")
    if not bytes_sent:
        return []
    bandwidth = by_hop("molink_hop_bandwidth_bits_per_second")
    latency = by_hop("molink_hop_latency_seconds")
    messages = by_hop("molink_hop_messages_sent_total")
    compression = {labels.get("hop", "?"): labels.get("compression", "") + (
        " (lossy)" if labels.get("lossy") == "yes" else "")
        for labels, _ in samples.get("molink_hop_info", [])}
    send_wait = _decode_mean_ms(samples, "molink_hop_send_wait_seconds")
    rows = [("hop", "bandwidth", "latency", "send wait", "messages", "sent", "compression")]
    for hop, num_bytes in bytes_sent.items():
        rows.append((hop, _measured(bandwidth.get(hop, 0.0) / 1e6, 1, "Mbit/s"),
                     _measured(latency.get(hop, 0.0) * 1e3, 2, "ms"),
                     f"{send_wait[hop]:.2f} ms" if hop in send_wait else "-",
                     f"{messages.get(hop, 0.0):,.0f}", f"{num_bytes / 1e6:,.3f} MB",
                     compression.get(hop) or "-"))
    return _table(rows, last_left=True)


def _table(rows: list[tuple[str, ...]], last_left: bool = False) -> list[str]:
    """Aligned rows: the first column to the left, the others to the right (the last one to
    the left with ``last_left``)."""
    right = len(rows[0]) - 1 - last_left
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join([row[0].ljust(widths[0])]
                             + [c.rjust(w) for c, w in zip(row[1:1 + right], widths[1:])]
                             + list(row[1 + right:])).rstrip() for row in rows]


def _measured(value: float, decimals: int, unit: str) -> str:
    """0 means not measured yet: shown as a dash, not as an impossible 0."""
    return f"{value:,.{decimals}f} {unit}" if value > 0 else "-"
