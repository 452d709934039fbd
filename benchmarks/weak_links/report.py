"""The report: per-setting tables against the bound, the headline ratios, the plots."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import torch

from benchmarks.weak_links.bound import Bound, compute_bound
from benchmarks.weak_links.measurement import RunResult
from benchmarks.weak_links.systems import (
    TARGET_LINK,
    TARGET_STAGES,
    Setting,
    Timing,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"


def find(results: list[RunResult], setting: Setting, key: str, workload: str) -> RunResult | None:
    for r in results:
        if r.setting == setting and r.system.key == key and r.workload == workload and r.ok:
            return r
    return None


def bounds_of(results, regimes, args) -> dict[Setting, Bound]:
    bounds = {}
    for setting in dict.fromkeys(r.setting for r in results):
        bounds[setting] = compute_bound(regimes[setting.regime], setting,
                                        find(results, setting, "c", "decode"),
                                        regimes[setting.regime].concurrency)
    return bounds


def setting_section(setting: Setting, results: list[RunResult], bound: Bound) -> str:
    headline = (f"Bound (decode-heavy): **{bound.value:.0f} tokens/s**, set by "
                f"{bound.binding}. Terms:")
    lines = [f"### {setting.name}", "", headline, ""]
    lines += [f"- {name}: {value:.0f} tokens/s ({how})" for name, value, how in bound.terms]
    lines.append("")
    for workload, title in (("decode", "decode-heavy"), ("mixed", "mixed")):
        rows = [r for r in results if r.setting == setting and r.workload == workload]
        if not rows:
            continue
        if workload == "mixed":
            floor = (f"TPOT floor (one token round the pipeline at batch 1, as in the "
                     f"concurrency term): {bound.round_trip_s * 1e3:.0f} ms.")
            lines += [floor, ""]
        lines += [f"**{title}**", "", TABLE_HEADER, TABLE_RULE]
        lines += [table_row(r, bound) for r in rows]
        notes = sorted({n for r in rows for n in r.notes})
        notes += [f"{r.system.label}, library hop stats (cumulative since start): "
                  + "; ".join(r.library_hops) for r in rows if r.library_hops]
        lines += [""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


TABLE_HEADER = ("| system | output tok/s | fraction of bound | TTFT p50 / p99 s "
                "| TPOT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 s | requests (unfinished) "
                "| micro-batches "
                "| stage decode step ms (in window) | bytes/token per link "
                "| CPU % head / stages / relays / other |")
TABLE_RULE = "|---|---:|---:|---|---|---|---|---|---|---|---|---|"


def table_row(r: RunResult, bound: Bound) -> str:
    if not r.ok:
        return f"| {r.system.label} | failed: {r.error.splitlines()[0][:120]} |||||||||||"

    def pair(p, scale=1.0, fmt="{:.2f}"):
        return "-" if p is None else f"{fmt.format(p[0] * scale)} / {fmt.format(p[1] * scale)}"

    fraction = f"{r.throughput / bound.value:.0%}" if r.workload == "decode" else "(load-set)"
    per_link = ", ".join(f"{b:.0f}" for b in r.hop_bytes_per_token)
    steps = ", ".join(f"{x:.1f}" for x in r.stage_step_ms)
    cpu = " / ".join(f"{r.cpu_percent.get(k, 0):.0f}"
                     for k in ("head", "stages", "relays", "other"))
    return (f"| {r.system.label} | {r.throughput:.1f} | {fraction} | {pair(r.ttft)} | "
            f"{pair(r.tpot, 1e3, '{:.0f}')} | {pair(r.itl, 1e3, '{:.0f}')} | "
            f"{pair(r.e2e, 1.0, '{:.1f}')} | {r.num_requests} "
            f"({r.num_unfinished}) | {r.num_microbatches} | {steps} | {per_link} | {cpu} |")


def summary(results, bounds) -> dict:
    """The headline ratios (emulated and CPU at the target setting); None where not measured."""
    emulated = Setting("emulated", TARGET_STAGES, TARGET_LINK)
    cpu = Setting("cpu", TARGET_STAGES, TARGET_LINK)
    a, c = find(results, emulated, "a", "decode"), find(results, emulated, "c", "decode")
    b_mixed, c_mixed = find(results, emulated, "b", "mixed"), find(results, emulated, "c", "mixed")
    c_cpu = find(results, cpu, "c", "decode")

    def ratio(x, y):
        return round(x / y, 3) if x is not None and y else None

    out = {
        "throughput_vs_sequential": ratio(c and c.throughput, a and a.throughput),
        "tpot_p99_reduction_vs_fifo": (round(1 - c_mixed.tpot[1] / b_mixed.tpot[1], 3)
                                       if c_mixed and b_mixed and c_mixed.tpot and b_mixed.tpot
                                       else None),
        "fraction_of_bound": ratio(c and c.throughput, emulated in bounds
                                   and bounds[emulated].value),
        "cpu_fraction_of_bound": ratio(c_cpu and c_cpu.throughput,
                                       cpu in bounds and bounds[cpu].value),
        "ttft_p99_vs_fifo_mixed": ratio(c_mixed and c_mixed.ttft and c_mixed.ttft[1],
                                        b_mixed and b_mixed.ttft and b_mixed.ttft[1]),
        "emulated_bound_tokens_per_s": round(bounds[emulated].value, 1) if emulated in bounds
        else None,
        "emulated_c_tokens_per_s": round(c.throughput, 1) if c else None,
        "emulated_a_tokens_per_s": round(a.throughput, 1) if a else None,
    }
    out["targets_met"] = {
        "throughput_vs_sequential>=3": _at_least(out["throughput_vs_sequential"], 3.0),
        "fraction_of_bound>=0.8": _at_least(out["fraction_of_bound"], 0.8),
        "tpot_p99_reduction_vs_fifo>=0.5_and_ttft_p99_no_worse": (
            None if out["tpot_p99_reduction_vs_fifo"] is None or out["ttft_p99_vs_fifo_mixed"]
            is None else out["tpot_p99_reduction_vs_fifo"] >= 0.5
            and out["ttft_p99_vs_fifo_mixed"] <= 1.0),
        "cpu_fraction_of_bound>=0.7": _at_least(out["cpu_fraction_of_bound"], 0.7),
    }
    return out


def _at_least(value, threshold):
    return None if value is None else value >= threshold


def write_report(args, timing: Timing, results, regimes, bounds, headline, elapsed_s) -> str:
    command = "python -m " + " ".join(shlex.quote(a) for a in ["benchmarks.weak_links",
                                                               *sys.argv[1:]])
    machine = (f"Machine: {len(os.sched_getaffinity(0))} cores (shared by the head, every stage "
               f"and every relay), torch {torch.__version__}, Python {sys.version.split()[0]}.")
    lines = ["# Weak links: sequential vs FIFO pipeline vs MoLink, against the bound", "",
             f"Command: `{command}` ({elapsed_s / 60:.1f} min)", "", machine, ""]
    for regime in regimes.values():
        lines.append(f"- **{regime.name}** model: {regime.description}; decode-heavy: "
                     f"{regime.concurrency} concurrent requests, {args.prompt_len}-token prompts.")
    lines += ["", METHOD.format(t=timing, min_tokens=timing.min_window_tokens), "",
              "## Headline (emulated and CPU at 3 stages, 100 Mbit/20 ms)", "",
              "```json", json.dumps(headline, indent=2), "```", ""]
    for setting, bound in bounds.items():
        lines.append(setting_section(setting, results, bound))
    return "\n".join(lines) + "\n"


METHOD = """\
Systems: (a) one micro-batch at a time, FIFO sends; (b) micro-batches = stages, FIFO, no
chunking; (c) measured micro-batching, `molink` link schedule; ablations turn one of these
off. Every system sends the model's own dtype (lossless, `--compression auto`) except
"(c) + int8 activations", the lossy compression row. Every pipeline is started fresh: a headless head
in the benchmark process, one `molink join` process per stage, one relay process per emulated
link (stage 1 shares the head's host: no link there).

Decode-heavy: the window starts {t.settle_s:.0f} s after every request got its first token and
lasts {t.decode_window_s:.0f} s, longer when needed for every request to get {min_tokens} tokens
in it (at most {t.decode_window_max_s:.0f} s); throughput = the sum over requests of (tokens in
the window - 1) / (time from its first to its last token in the window), which unlike tokens /
window does not depend on where the window cuts a round (the raw ratio is in the notes); TPOT
per request from its tokens in that window; TTFT from submission (all are submitted at once,
so it includes the initial prefill burst); e2e is not defined (requests are cut at the
window's end).

Mixed: {t.mixed_requests} requests with Poisson arrivals (same seeds, so the same requests
at the same times, for every system of a setting), prompts log-normal (median 128, up to
1,000) except every tenth, which is long (1,000-2,000 tokens), outputs log-normal (median 48,
up to {t.mixed_output_cap}); every request is waited for up to {t.mixed_drain_s:.0f} s after the
last arrival; throughput = output tokens / (last token - first arrival). ITL: gaps between
consecutive tokens of a request (a stall behind a prefill transfer shows there in full, while
TPOT spreads it over the request's tokens). The arrival rate offers half of (b)'s capacity
(uncompressed bytes per token on the link, the stages' prefill speed), so it does not saturate
(b) or (c): their throughput is set by the arrivals; (a), one resource busy at a time, may
fall behind (see unfinished).

Bytes/token per link: bytes counted at each relay (payload + protobuf + gRPC/HTTP2 framing)
divided by the tokens the library sent on that link (head.hop_stats()), between two moments
in the window when the link was idle (so no message is half counted); mixed: over the whole
run. The head learns a stage's token count only when a later result brings it back, so with
one or two large micro-batches in flight ((a), (b)) a round's burst can be counted on one
side and not yet on the other: their windowed figures can be off by a round's share (the
library's own cumulative figures are in the notes); with many micro-batches, as for (c) whose
figures set the bound's link terms, the error is a fraction of a percent. CPU %: of one core,
over the window (head = this process, with the client; other = processes that are not part of
this run)."""
