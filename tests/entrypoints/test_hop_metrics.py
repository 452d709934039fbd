"""Per-hop figures (``PipelineHead.hop_stats()``) reach ``/metrics`` and ``molink status``.

The head is a stand-in holding exactly what the metrics collector reads, so every value
the text format carries can be compared with the one the head reported.
"""

from __future__ import annotations

import json
import types

from prometheus_client.parser import text_string_to_metric_families

from molink.coordinator.head_stats import HeadStats
from molink.coordinator.pipeline_head import HopStats
from molink.coordinator.step_breakdown import StepBreakdown, StepTimes
from molink.entrypoints import status
from molink.entrypoints.metrics import HeadMetrics
from molink.messages import BatchEntry, StepPlan

HOPS = [
    HopStats(label="head -> layers 2:4", bandwidth_bps=940e6, latency_s=0.00021,
             bytes_sent=123_456, messages_sent=17, tokens_sent=170, compression="float16"),
    HopStats(label="layers 2:4 -> layers 4:6", bandwidth_bps=0.0, latency_s=0.0,
             bytes_sent=0, messages_sent=0, tokens_sent=0, compression="none"),
    HopStats(label="layers 4:6 -> head", bandwidth_bps=1.5e9, latency_s=0.0125,
             bytes_sent=9_876_543, messages_sent=16, tokens_sent=16, compression="int8"),
]


STAGES = ["head layers 0:2", "layers 2:4", "layers 4:6"]
DECODE = StepPlan(step_id=1, batch=[BatchEntry("a", 7, 1, True), BatchEntry("b", 9, 1, True)])
PREFILL = StepPlan(step_id=2, batch=[BatchEntry("a", 0, 7, True), BatchEntry("b", 9, 1, True)])
# Two decode steps (round trips 100 and 120 ms) and one prefill step.
STEPS = [(DECODE, StepTimes(0.100, (0.001, 0.002, 0.003), (0.010, 0.020, 0.030),
                            (0.0005, 0.0010, 0.0015), 0.004)),
         (DECODE, StepTimes(0.120, (0.003, 0.002, 0.001), (0.012, 0.022, 0.032),
                            (0.0015, 0.0010, 0.0005), 0.006)),
         (PREFILL, StepTimes(0.500, (0.0, 0.0, 0.0), (0.1, 0.1, 0.1), (0.0, 0.0, 0.0), 0.01))]


def _fake_head(hops: list[HopStats]):
    breakdown = StepBreakdown()
    for plan, times in STEPS:
        breakdown.record(plan, times)
    return types.SimpleNamespace(
        ready=True, num_in_flight=0, num_microbatches=3,
        tuner=types.SimpleNamespace(prompt_tokens_allowed=2048),
        stats=HeadStats(activation_bytes_sent=123_456),
        stage_labels=lambda: list(STAGES), stage_compute_s=[0.001, 0.002, 0.003],
        stage_roles=lambda: [(label, "active") for label in STAGES],
        scheduler=None, listeners=[], hop_stats=lambda: list(hops), breakdown=breakdown)


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
        ("molink_hop_info", {"hop": hop.label, "compression": hop.compression, "lossy": lossy},
         1.0) for hop, lossy in zip(HOPS, ["yes", "no", "yes"])]
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
    # send wait: the decode steps' mean (1.0 ms on every hop of STEPS)
    first = rows[0].strip().removeprefix(HOPS[0].label).split()
    assert first == ["940.0", "Mbit/s", "0.21", "ms", "1.00", "ms", "17", "0.123", "MB", "float16",
                     "(lossy)"]
    unmeasured = rows[1].strip().removeprefix(HOPS[1].label).split()
    assert unmeasured == ["-", "-", "1.00", "ms", "0", "0.000", "MB", "none"]
    last = rows[2].strip().removeprefix(HOPS[2].label).split()
    assert last == ["1,500.0", "Mbit/s", "12.50", "ms", "1.00", "ms", "16", "9.877", "MB",
                    "int8", "(lossy)"]


def test_the_step_breakdown_is_exported_per_kind_stage_and_hop():
    families = _families(HeadMetrics(_fake_head(HOPS)).render().decode())

    def summary(name: str, **labels: str) -> tuple[float, float]:
        found = {s.name.removeprefix(name): s.value for s in families[name].samples
                 if s.labels == labels}
        return found["_count"], found["_sum"]

    assert families["molink_step_seconds"].type == "summary"
    assert summary("molink_step_seconds", kind="decode", part="round_trip") == (2, 0.220)
    # the wire: round trip less every stage's wait and compute and every hop's send wait
    wire_1 = 0.100 - 0.006 - 0.060 - 0.003
    wire_2 = 0.120 - 0.006 - 0.066 - 0.003
    count, wire = summary("molink_step_seconds", kind="decode", part="wire")
    assert count == 2 and abs(wire - (wire_1 + wire_2)) < 1e-12
    assert summary("molink_step_seconds", kind="decode", part="head") == (2, 0.010)
    assert summary("molink_step_seconds", kind="prefill", part="round_trip") == (1, 0.5)
    count, wire = summary("molink_step_seconds", kind="prefill", part="wire")
    assert count == 1 and abs(wire - 0.2) < 1e-12
    count, compute = summary("molink_stage_step_seconds", kind="decode", stage="layers 4:6",
                             part="compute")
    assert count == 2 and abs(compute - 0.062) < 1e-12
    count, wait = summary("molink_stage_step_seconds", kind="decode", stage="head layers 0:2",
                          part="wait")
    assert count == 2 and abs(wait - 0.004) < 1e-12
    count, send = summary("molink_hop_send_wait_seconds", kind="decode", hop=HOPS[0].label)
    assert count == 2 and abs(send - 0.002) < 1e-12


def test_status_shows_a_decode_steps_trip(monkeypatch):
    pages = {"/health": json.dumps({"status": "ok", "pipeline": "..."}),
             "/metrics": HeadMetrics(_fake_head(HOPS)).render().decode()}
    monkeypatch.setattr(status, "fetch", lambda url: (200, pages[url[url.rindex("/"):]]))
    lines = status.render("127.0.0.1:8000").splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["decode", "step"])
    assert lines[start].split()[2:] == ["wait", "compute"]
    assert lines[start + 1].split() == ["head", "layers", "0:2", "2.00", "ms", "11.00", "ms"]
    assert lines[start + 3].split() == ["layers", "4:6", "2.00", "ms", "31.00", "ms"]
    assert lines[start + 4].split() == ["wire", "(all", "hops)", "38.00", "ms,", "head", "5.00",
                                        "ms,", "round", "trip", "110.00", "ms", "(mean", "of",
                                        "2", "decode", "steps)"]
