"""Prometheus metrics of a head (``GET /metrics``), names prefixed ``molink_``.

Counters and histograms are fed by a listener on the head's request events; gauges
(queue length, KV blocks, micro-batches in flight, pipeline readiness) and the per-hop
figures are read from the head when Prometheus scrapes, so the serving path pays nothing
for them.

Hops are labelled ``hop`` with the head's own label for each link, in pipeline order (the
last one is the results link back to the head)::

    molink_hop_bytes_sent_total{hop="head -> layers 2:4"}          counter
    molink_hop_messages_sent_total / molink_hop_tokens_sent_total  counters
    molink_hop_bandwidth_bits_per_second                           gauge, measured (0: unknown)
    molink_hop_latency_seconds                                     gauge, one way (0: unknown)
    molink_hop_info{hop=..., compression="...", lossy="yes|no"} 1  the hop's wire compression

Failover (a stage lost or leaving; its requests replayed on a standby or a new join)::

    molink_failovers_total                       counter
    molink_requests_replayed_total               counter: running requests whose KV was rebuilt
    molink_replay_pause_seconds                  summary: loss -> each replayed request's next token
    molink_replay_pause_max_seconds              gauge
    molink_stage_role{stage, role="active|draining|standby"} 1

Where a step's time goes (``StepBreakdown``), as summaries (``_count`` steps, ``_sum``
seconds) per step ``kind`` (decode: one token per request; prefill: any other step)::

    molink_step_seconds{kind, part="round_trip|wire|head"}    wire: all hops together
    molink_stage_step_seconds{kind, stage, part="wait|compute"}
    molink_hop_send_wait_seconds{kind, hop}                    compute end -> on the wire
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    SummaryMetricFamily,
)

from molink.coordinator.pipeline_head import HopStats, PipelineHead
from molink.messages import is_lossy

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class HeadMetrics:
    """Owns a registry for one head; ``render()`` gives the Prometheus text format."""

    def __init__(self, head: PipelineHead) -> None:
        self.head = head
        self.registry = CollectorRegistry()
        self.requests = Counter("molink_requests", "Requests by outcome", ["outcome"],
                                registry=self.registry)
        self.generated_tokens = Counter("molink_generated_tokens", "Tokens generated",
                                        registry=self.registry)
        self.ttft = Histogram("molink_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("molink_time_per_output_token_seconds",
                              "Time between output tokens", buckets=_LATENCY_BUCKETS,
                              registry=self.registry)
        self.registry.register(_HeadCollector(head))
        self._started: dict[str, float] = {}
        self._last: dict[str, tuple[float, int]] = {}  # request -> (time, tokens so far)
        head.listeners.append(self)

    # ---- listener ------------------------------------------------------------------------

    def on_request_added(self, request_id: str) -> None:
        self._started[request_id] = time.monotonic()

    def on_output(self, output) -> None:
        now = time.monotonic()
        rid = output.request_id
        tokens = len(output.outputs[0].token_ids)
        previous = self._last.get(rid)
        if previous is None and rid in self._started:
            self.ttft.observe(now - self._started[rid])
        elif previous is not None and tokens > previous[1]:
            self.tpot.observe((now - previous[0]) / (tokens - previous[1]))
        self.generated_tokens.inc(max(0, tokens - (previous[1] if previous else 0)))
        self._last[rid] = (now, tokens)
        if output.finished:
            self.requests.labels(outcome=output.outputs[0].finish_reason or "stop").inc()
            self._forget(rid)

    def on_request_aborted(self, request_id: str) -> None:
        self.requests.labels(outcome="abort").inc()
        self._forget(request_id)

    def on_request_failed(self, request_id: str) -> None:
        self.requests.labels(outcome="failed").inc()
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._started.pop(request_id, None)
        self._last.pop(request_id, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _HeadCollector:
    """Gauges read from the head at scrape time."""

    def __init__(self, head: PipelineHead) -> None:
        self.head = head

    def collect(self):
        head, scheduler = self.head, self.head.scheduler
        yield _gauge("molink_ready", "1 when every layer is served", float(head.ready))
        yield _gauge("molink_microbatches_in_flight", "Plans in the pipeline now",
                     head.num_in_flight)
        yield _gauge("molink_microbatches_target", "Plans the head keeps in flight (as "
                     "configured, or chosen from measurements)", head.num_microbatches)
        yield _gauge("molink_prefill_budget_tokens", "Prompt tokens the last step could carry "
                     "beside decoding requests (the stall bound, --decode-stall-factor; the "
                     "step's token budget where none was in force)",
                     head.tuner.prompt_tokens_allowed)
        yield _gauge("molink_steps_dispatched", "Steps sent into the pipeline",
                     head.stats.num_steps_dispatched)
        yield _gauge("molink_stage_failures", "Stages lost since start", head.stats.num_stage_failures)
        yield _gauge("molink_steps_timed_out", "Steps without a result within their deadline "
                     "(each failed the requests in the pipeline)", head.stats.num_steps_timed_out)
        yield _gauge("molink_route_failures", "Routes that could not be set up (then retried)",
                     head.stats.num_route_failures)
        yield from _failover_families(head)
        compute = GaugeMetricFamily("molink_stage_compute_seconds",
                                    "Compute time per step of each stage (EWMA)", labels=["stage"])
        for label, seconds in zip(head.stage_labels(), head.stage_compute_s):
            compute.add_metric([label], seconds)
        yield compute
        hop = GaugeMetricFamily("molink_hop_activation_bytes_sent",
                                "Activation bytes the head sent on its outgoing hop", labels=["hop"])
        hop.add_metric(["head"], head.stats.activation_bytes_sent)
        yield hop
        hops = head.hop_stats()
        yield from _hop_families(hops)
        yield from _breakdown_families(head.breakdown.totals, head.stage_labels(),
                                       [h.label for h in hops])
        if scheduler is not None:
            yield _gauge("molink_queue_length", "Requests waiting", scheduler.num_waiting)
            yield _gauge("molink_running_requests", "Requests holding KV", scheduler.num_running)
            yield _gauge("molink_kv_blocks_used", "KV blocks in use", scheduler.num_used_blocks)
            yield _gauge("molink_kv_blocks_free", "KV blocks free", scheduler.num_free_blocks)


def _failover_families(head: PipelineHead) -> list:
    stats = head.stats
    pause = SummaryMetricFamily("molink_replay_pause_seconds", "Each replayed request's pause: "
                                "from the loss of its stage to its next token",
                                count_value=stats.num_replays_done,
                                sum_value=stats.replay_pause_s_total)
    roles = GaugeMetricFamily("molink_stage_role", "Each stage's role: active, draining "
                              "(leaving once its requests end) or standby", labels=["stage", "role"])
    for label, role in head.stage_roles():
        roles.add_metric([label, role], 1)
    return [CounterMetricFamily("molink_failovers", "Failovers: a stage lost or leaving, its "
                                "requests kept for replay", value=stats.num_failovers),
            CounterMetricFamily("molink_requests_replayed", "Running requests whose KV was "
                                "rebuilt on a new route", value=stats.num_requests_replayed),
            pause, _gauge("molink_replay_pause_max_seconds", "Longest replay pause",
                          stats.replay_pause_s_max), roles]


def _hop_families(hops: list[HopStats]) -> list:
    """One family per figure, one sample per hop (``hops`` in pipeline order)."""
    labels = ["hop"]
    families = [
        (CounterMetricFamily("molink_hop_bytes_sent", "Bytes sent on each hop", labels=labels),
         "bytes_sent"),
        (CounterMetricFamily("molink_hop_messages_sent", "Messages sent on each hop",
                             labels=labels), "messages_sent"),
        (CounterMetricFamily("molink_hop_tokens_sent", "Tokens whose activations or results "
                             "each hop carried", labels=labels), "tokens_sent"),
        (GaugeMetricFamily("molink_hop_bandwidth_bits_per_second",
                           "Measured bandwidth of each hop (0 until measured)", labels=labels),
         "bandwidth_bps"),
        (GaugeMetricFamily("molink_hop_latency_seconds",
                           "Measured one-way latency of each hop (0 until measured)",
                           labels=labels), "latency_s"),
    ]
    info = InfoMetricFamily("molink_hop", "Wire compression of each hop", labels=labels)
    for hop in hops:
        for family, field in families:
            family.add_metric([hop.label], getattr(hop, field))
        info.add_metric([hop.label], {"compression": hop.compression,
                                      "lossy": "yes" if is_lossy(hop.compression) else "no"})
    return [family for family, _ in families] + [info]


def _breakdown_families(totals: dict, stages: list[str], hops: list[str]) -> list:
    """The per-step time breakdown of ``StepBreakdown.totals`` (kind -> Totals)."""
    step = SummaryMetricFamily("molink_step_seconds", "Each step's round trip from the head "
                               "and back, its time on the wire (every hop together), and the "
                               "head's time delivering it and dispatching the next",
                               labels=["kind", "part"])
    stage = SummaryMetricFamily("molink_stage_step_seconds", "Each step's time in each stage: "
                                "waiting for the compute, computing", labels=["kind", "stage",
                                                                                "part"])
    send = SummaryMetricFamily("molink_hop_send_wait_seconds", "Each step's time between its "
                               "compute and its write on each hop (encoding, scheduling, "
                               "pacing)", labels=["kind", "hop"])
    for kind, t in totals.items():
        for part in ("round_trip", "wire", "head"):
            step.add_metric([kind, part], t.count, getattr(t, f"{part}_s"))
        for label, wait, compute in zip(stages, t.wait_s, t.compute_s):
            stage.add_metric([kind, label, "wait"], t.count, wait)
            stage.add_metric([kind, label, "compute"], t.count, compute)
        for label, seconds in zip(hops, t.send_wait_s):
            send.add_metric([kind, label], t.count, seconds)
    return [step, stage, send]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
