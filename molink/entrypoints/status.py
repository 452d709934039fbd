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
    for labels, seconds in samples.get("molink_stage_compute_seconds", []):
        lines.append(f"  {labels.get('stage', '?'):<48} {seconds * 1e3:8.1f} ms/step")
    for name, title in (("molink_running_requests", "running requests"),
                        ("molink_queue_length", "waiting requests"),
                        ("molink_kv_blocks_used", "KV blocks used"),
                        ("molink_kv_blocks_free", "KV blocks free"),
                        ("molink_microbatches_in_flight", "micro-batches in flight"),
                        ("molink_generated_tokens_total", "tokens generated"),
                        ("molink_hop_activation_bytes_sent", "activation bytes sent by the head")):
        for _, value in samples.get(name, []):
            lines.append(f"  {title:<48} {value:,.0f}")
    return "\n".join(lines)
