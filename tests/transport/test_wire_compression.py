"""Wire compression is lossless unless asked for: ``auto`` (the default) puts the model's
own dtype on the wire however slow the link measures, and a lossy encoding given
explicitly is named on its hop in ``/metrics`` and ``molink status``."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from molink import SamplingParams
from molink.entrypoints import status
from molink.entrypoints.metrics import HeadMetrics
from molink.messages import WIRE_COMPRESSIONS, is_lossy
from molink.runtime.wire_tensor import from_raw, to_raw
from molink.transport.link_meter import LinkMeter
from tests.coordinator.pipeline_harness import generate_all, pipeline

CPU = torch.device("cpu")
PROBE_BYTES = 64 * 1024


def _meter_on(bandwidth_bps: float, latency_s: float) -> LinkMeter:
    meter = LinkMeter()
    small_rtt = 2 * latency_s
    meter.probed(small_rtt, small_rtt + PROBE_BYTES * 8 / bandwidth_bps, PROBE_BYTES, 0.0)
    return meter


def _activations(dtype: torch.dtype) -> torch.Tensor:
    """Rows with a wide range: tiny, ordinary and (for 32 bits) beyond float16's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 64, generator=gen) * torch.logspace(-6, 6, 9).unsqueeze(1)
    if dtype == torch.float32:
        x[0, 0] = 1e30
    return x.to(dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bandwidth_bps", [1e5, 20e6, 100e6, 1e10])
def test_auto_never_selects_a_lossy_encoding(dtype, bandwidth_bps):
    meter = _meter_on(bandwidth_bps, 0.05)
    for _ in range(3):  # however the link measures, before and after traffic
        choice = meter.wire_compression("auto", dtype)
        assert choice == "none" and not is_lossy(choice)
        assert meter.link.compression == "none"  # what the hop reports
        x = _activations(getattr(torch, dtype))
        assert torch.equal(from_raw(to_raw(x, choice), CPU), x)  # bit for bit
        meter.acknowledged(PROBE_BYTES, 1.0)  # a much slower link than the probe said


@pytest.mark.parametrize("compression", [c for c in WIRE_COMPRESSIONS if c != "none"])
def test_a_lossy_encoding_is_used_only_when_asked_and_reported_as_such(compression):
    meter = _meter_on(1e10, 0.0001)  # a fast link: nothing would call for compression
    assert meter.wire_compression(compression, "float32") == compression
    assert meter.link.compression == compression and is_lossy(compression)
    x = _activations(torch.float32)
    assert not torch.equal(from_raw(to_raw(x, compression), CPU, torch.float32), x)
    # A cast to the activations' own dtype changes nothing, and says so.
    if compression in ("float16", "bfloat16"):
        assert meter.wire_compression(compression, compression) == "none"


def test_an_explicit_lossy_encoding_is_named_in_metrics_and_status(tiny_model_dir,
                                                                  monkeypatch):
    directory = tiny_model_dir("llama")  # 4 layers
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def scenario():
        async with pipeline(directory, (0, 1), ["1:"], compression="int8") as (head, _):
            await generate_all(head, [[5, 9, 11, 13], [7, 8]], params)
            return HeadMetrics(head).render().decode(), [h.label for h in head.hop_stats()]

    text, hops = asyncio.run(scenario())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    info = {s.labels["hop"]: s.labels for s in families["molink_hop_info"].samples}
    first, results = hops  # head -> layers 1:4 (activations), layers 1:4 -> head (tokens)
    assert info[first]["compression"] == "int8" and info[first]["lossy"] == "yes"
    assert info[results]["compression"] == "none" and info[results]["lossy"] == "no"

    pages = {"/health": json.dumps({"status": "ok", "pipeline": "..."}), "/metrics": text}
    monkeypatch.setattr(status, "fetch", lambda url: (200, pages[url[url.rindex("/"):]]))
    row = next(line for line in status.render("x:1").splitlines() if first in line)
    assert row.rstrip().endswith("int8 (lossy)")
