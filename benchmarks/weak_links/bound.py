"""The bound: the best decode-heavy throughput a setting's stages and links allow."""

from __future__ import annotations

import os
from dataclasses import dataclass

from benchmarks.weak_links.measurement import RunResult
from benchmarks.weak_links.regimes import Regime
from benchmarks.weak_links.systems import Setting
from molink.scheduler.placement import split_layers
from molink.transport.link_emulator import LinkSpec


@dataclass
class Bound:
    terms: list[tuple[str, float, str]]  # (name, tokens/s, how it was obtained)
    round_trip_s: float  # one token round the pipeline at batch 1: also the TPOT floor

    @property
    def value(self) -> float:
        return min(v for _, v, _ in self.terms)

    @property
    def binding(self) -> str:
        return min(self.terms, key=lambda t: t[1])[0]


def compute_bound(regime: Regime, setting: Setting, decode_c: RunResult | None,
                  max_num_seqs: int) -> Bound:
    """The decode-heavy throughput bound of a setting (see the package docstring)."""
    spec = LinkSpec.parse(setting.link)
    bandwidth = spec.bandwidth_bps / 8  # bytes/s
    ranges = split_layers(regime.num_layers, setting.num_stages)
    context = decode_c.mean_context if decode_c and decode_c.ok else regime.cpu_context or 64
    if regime.profile is None:
        context = regime.cpu_context
    max_batch = min(max_num_seqs, regime.concurrency)
    batches = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, max_batch})
    batches = [b for b in batches if b <= max_batch]
    terms = []
    for i, layers in enumerate(ranges):
        best = max(batches, key=lambda b: b / regime.step_s(layers, b, context))
        cap = best / regime.step_s(layers, best, context)
        how = (f"best batch {best}: {regime.step_s(layers, best, context) * 1e3:.1f} ms/step, "
               f"context {context:.0f}" + ("" if regime.profile else ", one core"))
        terms.append((f"stage {i + 1} (layers {layers[0]}:{layers[1]})", cap, how))
    if regime.profile is None:
        cores = len(os.sched_getaffinity(0))
        best = max(batches, key=lambda b: b / sum(regime.step_s(r, b, context) for r in ranges))
        total = sum(regime.step_s(r, best, context) for r in ranges)
        terms.append((f"machine ({cores} cores shared by all stages)", cores * best / total,
                      f"best batch {best}: all layers {total * 1e3:.1f} ms/step on one core"))
    measured = decode_c.hop_bytes_per_token if decode_c and decode_c.ok else []
    round_trip = sum(regime.step_s(r, 1, context) for r in ranges)
    for j in range(setting.num_stages):
        name = (f"link stage {j + 1} -> stage {j + 2}" if j + 1 < setting.num_stages
                else f"link stage {j + 1} -> head")
        if j < len(measured) and measured[j] > 0:
            per_token, how = measured[j], "bytes/token counted at the relay in (c)'s window"
        elif j + 1 < setting.num_stages:
            per_token, how = regime.hidden_size * regime.element_bytes, "hidden x dtype bytes"
        else:
            per_token, how = 16.0, "token id + framing (estimate)"
        terms.append((name, bandwidth / per_token, f"{per_token:.0f} B/token; {how}"))
        round_trip += spec.latency_s + per_token / bandwidth
    terms.append(("concurrency / round trip", regime.concurrency / round_trip,
                  (f"{regime.concurrency} requests / {round_trip * 1e3:.1f} ms (latencies "
                   "+ one token's transfer per link + every stage's step at batch 1)")))
    return Bound(terms, round_trip)
