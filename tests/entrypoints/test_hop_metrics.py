"""Per-hop figures (``PipelineHead.hop_stats()``) reach ``/metrics`` and ``molink status``.

The head is a stand-in holding exactly what the metrics collector reads, so every value
the text format carries can be compared with the one the head reported.
"""

from __future__ import annotations

import json
import types

from prometheus_client.parser import text_string_to_metric_families

from molink.coordinator.head_loop import HeadStats
from molink.coordinator.pipeline_head import HopStats
from molink.entrypoints import status
from molink.entrypoints.metrics import HeadMetrics

HOPS = [
    HopStats(label="head -> layers 2:4", bandwidth_bps=940e6, latency_s=0.00021,
             bytes_sent=123_456, messages_sent=17, tokens_sent=170, compression="fp16"),
    HopStats(label="layers 2:4 -> layers 4:6", bandwidth_bps=0.0, latency_s=0.0,
             bytes_sent=0, messages_sent=0, tokens_sent=0, compression="none"),
    HopStats(label="layers 4:6 -> head", bandwidth_bps=1.5e9, latency_s=0.0125,
             bytes_sent=9_876_543, messages_sent=16, tokens_sent=16, compression="int8"),
]


def _fake_head(hops: list[HopStats]):
    return types.SimpleNamespace(
        ready=True, num_in_flight=0, stats=HeadStats(activation_bytes_sent=123_456),
        stage_labels=lambda: ["head layers 0:2", "layers 2:4", "layers 4:6"],
        stage_compute_s=[0.001, 0.002, 0.003], scheduler=None, listeners=[],
        hop_stats=lambda: list(hops))


def _families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_every_hop_figure_is_exported_with_its_type_and_value():
    families = _families(HeadMetrics(_fake_head(HOPS)).render().decode())
    expected = {  # family name -> (type, sample name, HopStats field)
        "molink_hop_bytes_sent": ("counter", "molink_hop_bytes_sent_total", "bytes_sent"),
        "molink_hop_messages_sent": ("counter", "molink_hop_messages_sent_total",
                                     "messages_sent"),
        "molink_hop_tokens_sent": ("counter", "molink_hop_tokens_sent_total", "tokens_sent"),
        "molink_hop_bandwidth_bits_per_second": (
            "gauge", "molink_hop_bandwidth_bits_per_second", "bandwidth_bps"),
        "molink_hop_latency_seconds": ("gauge", "molink_hop_latency_seconds", "latency_s"),
    }
    for name, (kind, sample_name, field) in expected.items():
        family = families[name]
        assert family.type == kind, name
        samples = [s for s in family.samples if s.name == sample_name]
        assert [s.labels for s in samples] == [{"hop": hop.label} for hop in HOPS], name
        assert [s.value for s in samples] == [float(getattr(hop, field)) for hop in HOPS], name
    info = families["molink_hop_info"]  # an info metric: a gauge of 1 in the text format
    assert info.type == "gauge"
    assert [(s.name, s.labels, s.value) for s in info.samples] == [
        ("molink_hop_info", {"hop": hop.label, "compression": hop.compression}, 1.0)
        for hop in HOPS]
    # What was there before stays.
    head_hop = families["molink_hop_activation_bytes_sent"].samples
    assert [(s.labels, s.value) for s in head_hop] == [({"hop": "head"}, 123_456.0)]


def test_a_head_without_hops_exports_empty_hop_families():
    families = _families(HeadMetrics(_fake_head([])).render().decode())
    assert families["molink_hop_bytes_sent"].samples == []
    assert families["molink_ready"].samples[0].value == 1.0


def test_status_prints_one_row_per_hop_in_pipeline_order(monkeypatch):
    metrics_text = HeadMetrics(_fake_head(HOPS)).render().decode()
    pages = {"/health": json.dumps({"status": "ok", "pipeline": "head layers 0:2 -> ..."}),
             "/metrics": metrics_text}
    monkeypatch.setattr(status, "fetch", lambda url: (200, pages[url[url.rindex("/"):]]))
    lines = status.render("127.0.0.1:8000").splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["hop", "bandwidth"])
    rows = lines[header + 1:header + 1 + len(HOPS)]
    assert len(rows) == len(HOPS)
    assert [row.strip().startswith(hop.label) for row, hop in zip(rows, HOPS)] == [True] * 3
    first = rows[0].strip().removeprefix(HOPS[0].label).split()
    assert first == ["940.0", "Mbit/s", "0.21", "ms", "17", "0.123", "MB", "fp16"]
    unmeasured = rows[1].strip().removeprefix(HOPS[1].label).split()
    assert unmeasured == ["-", "-", "0", "0.000", "MB", "none"]
    last = rows[2].strip().removeprefix(HOPS[2].label).split()
    assert last == ["1,500.0", "Mbit/s", "12.50", "ms", "16", "9.877", "MB", "int8"]
