"""Head metrics parse as Prometheus text, move as requests are served, and show that a
request abandoned mid-stream gives its KV blocks back."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from molink import SamplingParams
from molink.entrypoints.metrics import HeadMetrics
from tests.coordinator.pipeline_harness import pipeline


def metric_samples(metrics: HeadMetrics) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_move_and_abandoned_streams_free_kv(tiny_model_dir):
    async def scenario():
        async with pipeline(tiny_model_dir("llama"), (0, 2), ["2:4"]) as (head, _):
            metrics = HeadMetrics(head)
            before = metric_samples(metrics)
            params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            async for _ in head.generate([5, 6, 7], params):
                pass
            served = metric_samples(metrics)
            long = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
            stream = head.generate(list(range(10, 40)), long)
            await stream.__anext__()  # generation under way, KV held
            await stream.__anext__()
            holding = metric_samples(metrics)
            await stream.aclose()  # the client goes away
            while head.scheduler.num_in_flight_plans:  # let in-flight steps come back
                await asyncio.sleep(0.01)
            released = metric_samples(metrics)
            return before, served, holding, released

    before, served, holding, released = asyncio.run(scenario())
    assert before["molink_ready"] == 1.0
    assert served["molink_requests_total{outcome=length}"] == 1.0
    assert served["molink_generated_tokens_total"] == 6.0
    assert served["molink_time_to_first_token_seconds_count"] == 1.0
    assert served["molink_time_per_output_token_seconds_count"] >= 1.0
    assert served["molink_hop_activation_bytes_sent{hop=head}"] > 0
    stage_times = {k: v for k, v in served.items() if k.startswith("molink_stage_compute_seconds")}
    assert len(stage_times) == 2 and all(v > 0 for v in stage_times.values())
    assert any("stage=head layers 0:2" in k for k in stage_times)
    assert holding["molink_kv_blocks_used"] > 0
    assert released["molink_kv_blocks_used"] == 0.0
    assert released["molink_kv_blocks_free"] == before["molink_kv_blocks_free"]
