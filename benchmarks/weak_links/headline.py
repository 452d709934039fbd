"""The weak-links headline, each technique credited only with what it adds.

Emulated RTX 3090-class stages (``molink join --emulate-device rtx3090``: the roofline fitted
to published RTX 3090 step times, LM head on the last stage), 3 stages, every link through a
100 Mbit/20 ms relay; Qwen2.5-32B with 4-bit weights, checked to fit each card with the
workload's KV cache (in bf16 a third of it and its embeddings leave no room for 512
requests' KV on a 24 GiB card). Every system sends the model's own dtype (lossless):

  (a)   sequential: one micro-batch in flight, FIFO sends
  (b)   FIFO pipeline: micro-batches = stages, FIFO sends, prefill sent whole
  (b*)  FIFO pipeline with its micro-batch count tuned: each of 2, 3, 4, 6, 8 run once,
        the best one then run like every other cell
  (c)   MoLink: measured micro-batching, decode-first link scheduling with just-in-time
        prefill chunks; ablations turn one technique off; (c)+int8 is the compression row

Decode-heavy: 512 requests at once, 16-token prompts; a window of at least 30 decode rounds
(every request gets 31 tokens in it). Mixed: 200 requests, Poisson arrivals offering half of
(b)'s capacity, every tenth prompt 1,000-2,000 tokens (where prefill transfers block
decodes). Every cell runs ``--repeats`` times (3), cells interleaved so drift hits all
alike; the report gives the median and the spread (min-max). The bound is computed per wire
encoding from that encoding's measured bytes per token. Stage step times are the decode
steps inside the window (from the stages' own timings). The cost-profit margin is
(revenue - cost) / cost per hour at the prices of ``benchmarks/configs/costs.json``.

    python -m benchmarks.weak_links.headline           # ~75 min on 2 cores; writes results
    python -m benchmarks.weak_links.headline --quick   # one run per cell, short; prints only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.weak_links.bound import Bound, compute_bound
from benchmarks.weak_links.grid import run_job
from benchmarks.weak_links.measurement import RunResult
from benchmarks.weak_links.regimes import check_fits, emulated_regime
from benchmarks.weak_links.relay import Relays
from benchmarks.weak_links.systems import SYSTEMS, Job, Setting, Timing, fifo_with

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
COSTS = ROOT / "benchmarks" / "configs" / "costs.json"
TUNE_COUNTS = (2, 3, 4, 6, 8)
DECODE_CONTEXT = 256  # tokens per decode-heavy request the memory check provides for
DECODE_KEYS = ("a", "b", "b*", "c", "c-fifo", "c-priority", "c-stages-mb", "c-no-stall",
               "c-int8")
MIXED_KEYS = ("b*", "c", "c-fifo", "c-priority", "c-no-stall")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weak_links.headline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-32b", choices=["qwen2.5-32b", "llama-2-70b"])
    parser.add_argument("--device-profile", default="rtx3090")
    parser.add_argument("--quantization", default="int4", choices=["int4", "int8", "none"])
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--link", default="100mbit:20ms")
    parser.add_argument("--concurrency", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mixed-requests", type=int, default=200)
    parser.add_argument("--load", type=float, default=0.5)
    parser.add_argument("--costs", default=str(COSTS), help="prices (JSON, see the default)")
    parser.add_argument("--skip-mixed", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.mixed_requests = 1, 24
    return args


def make_timing(args) -> Timing:
    if args.quick:
        return Timing(decode_window_s=4, decode_window_max_s=60, settle_s=1,
                      first_token_timeout_s=180, mixed_requests=args.mixed_requests,
                      mixed_drain_s=60, mixed_output_cap=64, min_window_tokens=6)
    return Timing(decode_window_s=8, decode_window_max_s=240, settle_s=1,
                  first_token_timeout_s=300, mixed_requests=args.mixed_requests,
                  mixed_drain_s=180, mixed_output_cap=128, min_window_tokens=31)


# ---- the runs --------------------------------------------------------------------------------

async def run(args, timing: Timing) -> tuple[dict, object, list[str], list[RunResult]]:
    """-> (cells: (key, workload) -> runs, the regime, the fit lines, the tuning runs)."""
    setting = Setting("emulated", args.stages, args.link)
    quantization = None if args.quantization == "none" else args.quantization
    with tempfile.TemporaryDirectory(prefix="molink-headline-") as tmp:
        work = Path(tmp)
        regime = emulated_regime(args.model, work, args.device_profile, args.concurrency,
                                 quantization)
        fit = check_fits(regime, args.stages,
                         args.concurrency * (args.prompt_len + DECODE_CONTEXT))
        print("memory:\n  " + "\n  ".join(fit), flush=True)
        relays = Relays(work)
        tuning: list[RunResult] = []
        try:
            print(f"\n== tuning (b)'s micro-batch count: {TUNE_COUNTS}", flush=True)
            for count in TUNE_COUNTS:
                await run_job(Job(setting, fifo_with(count), ("decode",)), regime, relays,
                              timing, args, tuning)
            best = max((r for r in tuning if r.ok), key=lambda r: r.throughput)
            count = int(best.system.microbatches)
            tuned = fifo_with(count, "b*", f"(b*) FIFO pipeline, tuned: {count} micro-batches")
            systems = {**SYSTEMS, "b*": tuned}
            cells: dict[tuple[str, str], list[RunResult]] = {}
            plan = [(key, "decode") for key in DECODE_KEYS]
            if not args.skip_mixed:
                plan += [(key, "mixed") for key in MIXED_KEYS]
            for repeat in range(args.repeats):
                print(f"\n== repeat {repeat + 1} of {args.repeats}", flush=True)
                for key, workload in plan:
                    runs: list[RunResult] = []
                    await run_job(Job(setting, systems[key], (workload,)), regime, relays,
                                  timing, args, runs)
                    cells.setdefault((key, workload), []).extend(runs)
        finally:
            await relays.stop_all()
    return cells, regime, fit, tuning


# ---- aggregation -------------------------------------------------------------------------------

def ok_runs(cells, key: str, workload: str) -> list[RunResult]:
    return [r for r in cells.get((key, workload), []) if r.ok]


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """median [min-max]"""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return (f"{fmt.format(statistics.median(values))} "
            f"[{fmt.format(min(values))}-{fmt.format(max(values))}]")


def median_run(runs: list[RunResult]) -> RunResult | None:
    ordered = sorted(runs, key=lambda r: r.throughput)
    return ordered[len(ordered) // 2] if ordered else None


def bounds_by_encoding(cells, regime, setting: Setting, concurrency: int) -> dict[str, Bound]:
    """The decode-heavy bound per wire encoding, from the median run of the system that sends
    it with the most micro-batches ((c) and (c)+int8)."""
    bounds = {}
    for encoding, key in (("lossless", "c"), ("int8", "c-int8")):
        run = median_run(ok_runs(cells, key, "decode"))
        if run is not None:
            bounds[encoding] = compute_bound(regime, setting, run, concurrency)
    return bounds


def encoding_of(key: str) -> str:
    return "int8" if key == "c-int8" else "lossless"


def ratio_cell(cells, top: str, bottom: str) -> tuple[float, float, float] | None:
    """(median ratio of medians, lowest, highest ratio across runs) of decode throughput."""
    x = [r.throughput for r in ok_runs(cells, top, "decode")]
    y = [r.throughput for r in ok_runs(cells, bottom, "decode")]
    if not x or not y:
        return None
    return (statistics.median(x) / statistics.median(y), min(x) / max(y), max(x) / min(y))


def margin(tokens_per_s: float, num_gpus: int, gpu_usd_per_hour: float,
           usd_per_million_tokens: float) -> float:
    """(revenue - cost) / cost for an hour at this throughput."""
    cost = num_gpus * gpu_usd_per_hour
    revenue = tokens_per_s * 3600 / 1e6 * usd_per_million_tokens
    return (revenue - cost) / cost


# ---- the report -------------------------------------------------------------------------------

def render(args, timing, cells, regime, fit, tuning, elapsed_s: float) -> tuple[str, dict]:
    setting = Setting("emulated", args.stages, args.link)
    bounds = bounds_by_encoding(cells, regime, setting, args.concurrency)
    costs = json.loads(Path(args.costs).read_text())
    gpu_price = costs["gpu_usd_per_hour"][args.device_profile]
    token_price = costs["usd_per_million_output_tokens"][args.model]
    command = "python -m " + " ".join(shlex.quote(a) for a in [
        "benchmarks.weak_links.headline", *sys.argv[1:]])
    labels = {key: runs[0].system.label for (key, _), runs in cells.items() if runs}
    headline = summarize(cells, bounds)
    lines = ["# Weak links: the lossless headline, each technique's own gain", "",
             (f"Command: `{command}` ({elapsed_s / 60:.1f} min, finished "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"), "",
             f"Model: {regime.description}.", "",
             (f"Setting: {args.stages} stages, every link {args.link} (a relay process per link; "
             "stage 1 shares the head's host). Memory, checked before any run "
             f"({args.concurrency} requests x {args.prompt_len + DECODE_CONTEXT} tokens of KV):"),
             ""] + [f"- {line}" for line in fit] + [
             "", (f"Runs per cell: {args.repeats} (median [min-max]). Decode-heavy: "
             f"{args.concurrency} requests at once, {args.prompt_len}-token prompts, a window of "
             f"at least {timing.decode_window_s:.0f} s and {timing.min_window_tokens - 1} decode "
             f"rounds (every request {timing.min_window_tokens} tokens in it). Mixed: "
             f"{timing.mixed_requests} requests (see `benchmarks/weak_links/workloads.py`)."), "",
             "## Headline", "", "```json", json.dumps(headline, indent=2), "```", ""]
    lines += tuning_section(tuning)
    lines += bound_section(bounds)
    lines += decode_section(cells, labels, bounds)
    lines += mixed_section(cells, labels)
    lines += cost_section(cells, labels, args, gpu_price, token_price, costs)
    lines += plain_section(cells, labels)
    lines += ["## Machine", "", "```", subprocess.run(["lscpu"], capture_output=True, text=True,
                                                         check=False).stdout.strip(), "```", ""]
    return "\n".join(lines) + "\n", headline


def summarize(cells, bounds) -> dict:
    out = {}
    for name, top, bottom in (("c_over_a", "c", "a"), ("c_over_tuned_fifo", "c", "b*"),
                              ("c_over_fifo_stages", "c", "b"),
                              ("int8_over_c", "c-int8", "c")):
        value = ratio_cell(cells, top, bottom)
        out[name] = None if value is None else {"median": round(value[0], 3),
                                                "range": [round(value[1], 3), round(value[2], 3)]}
    c_runs = [r.throughput for r in ok_runs(cells, "c", "decode")]
    if c_runs and "lossless" in bounds:
        value = bounds["lossless"].value
        out["c_fraction_of_lossless_bound"] = {
            "median": round(statistics.median(c_runs) / value, 3),
            "range": [round(min(c_runs) / value, 3), round(max(c_runs) / value, 3)]}
    return out


def tuning_section(tuning: list[RunResult]) -> list[str]:
    lines = ["## Tuning (b)'s micro-batch count (one run each)", "",
             "| micro-batches | output tok/s | TPOT p99 ms |", "|---:|---:|---:|"]
    for r in tuning:
        value = f"{r.throughput:.1f}" if r.ok else f"failed: {r.error[:80]}"
        tpot = f"{r.tpot[1] * 1e3:.0f}" if r.ok and r.tpot else "-"
        lines.append(f"| {r.system.microbatches} | {value} | {tpot} |")
    return [*lines, ""]


def bound_section(bounds: dict[str, Bound]) -> list[str]:
    lines = ["## The bound, per wire encoding (decode-heavy)", ""]
    for encoding, bound in bounds.items():
        lines.append(f"**{encoding}: {bound.value:.0f} tokens/s**, set by {bound.binding}:")
        lines += [""] + [f"- {name}: {value:.0f} tokens/s ({how})"
                         for name, value, how in bound.terms] + [""]
    return lines


def decode_section(cells, labels, bounds) -> list[str]:
    lines = ["## Decode-heavy", "",
             ("| system | output tok/s | fraction of own bound | TPOT p99 ms | ITL p99 ms "
             "| TTFT p99 s | decode rounds in window | stage decode step ms (in window) "
             "| bytes/token per link | micro-batches |"),
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for key in DECODE_KEYS:
        runs = ok_runs(cells, key, "decode")
        failed = len(cells.get((key, "decode"), [])) - len(runs)
        if not runs:
            lines.append(f"| {labels.get(key, key)} | all {failed} runs failed |||||||||")
            continue
        bound = bounds.get(encoding_of(key))
        fraction = spread([r.throughput / bound.value for r in runs], "{:.0%}") if bound else "-"
        middle = median_run(runs)
        steps = " / ".join(f"{x:.1f}" for x in middle.stage_step_ms)
        per_link = ", ".join(f"{b:.0f}" for b in middle.hop_bytes_per_token)
        label = labels[key] + (f" ({failed} failed)" if failed else "")
        lines.append(
            f"| {label} | {spread([r.throughput for r in runs])} | {fraction} "
            f"| {spread([r.tpot[1] * 1e3 for r in runs if r.tpot], '{:.0f}')} "
            f"| {spread([r.itl[1] * 1e3 for r in runs if r.itl], '{:.0f}')} "
            f"| {spread([r.ttft[1] for r in runs if r.ttft], '{:.2f}')} "
            f"| {min(r.num_rounds for r in runs)}+ | {steps} | {per_link} "
            f"| {middle.num_microbatches} |")
    return [*lines, "", "Stage steps and bytes per link: the median-throughput run.", ""]


def mixed_section(cells, labels, keys=MIXED_KEYS) -> list[str]:
    keys = [k for k in keys if cells.get((k, "mixed"))]
    if not keys:
        return []
    lines = ["## Mixed workload (long prompts among short requests)", "",
             ("| system | output tok/s (arrival-set) | TTFT p50 s | TTFT p99 s | TPOT p99 ms "
             "| ITL p99 ms | ITL p50 ms | unfinished |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in keys:
        runs = ok_runs(cells, key, "mixed")
        if not runs:
            lines.append(f"| {labels[key]} | all runs failed |||||||")
            continue
        lines.append(
            f"| {labels[key]} | {spread([r.throughput for r in runs])} "
            f"| {spread([r.ttft[0] for r in runs if r.ttft], '{:.2f}')} "
            f"| {spread([r.ttft[1] for r in runs if r.ttft], '{:.2f}')} "
            f"| {spread([r.tpot[1] * 1e3 for r in runs if r.tpot], '{:.0f}')} "
            f"| {spread([r.itl[1] * 1e3 for r in runs if r.itl], '{:.0f}')} "
            f"| {spread([r.itl[0] * 1e3 for r in runs if r.itl], '{:.0f}')} "
            f"| {spread([float(r.num_unfinished) for r in runs], '{:.0f}')} |")
    notes = sorted({n for k in keys for r in ok_runs(cells, k, "mixed") for n in r.notes
                    if n.startswith("arrivals")})
    return [*lines, "", *[f"- {n}" for n in notes], ""]


def cost_section(cells, labels, args, gpu_price, token_price, costs) -> list[str]:
    lines = ["## Cost-profit margin (decode-heavy throughput)", "",
             (f"(revenue - cost) / cost per hour: {args.stages} x {args.device_profile} at "
             f"${gpu_price:.2f}/h each, output tokens at ${token_price:.2f} per million "
             f"({costs.get('note', '')})."), "",
             "| system | output tok/s | revenue $/h | cost $/h | margin |", "|---|---:|---:|---:|---:|"]
    for key in DECODE_KEYS:
        runs = ok_runs(cells, key, "decode")
        if not runs:
            continue
        tps = statistics.median(r.throughput for r in runs)
        margins = [margin(r.throughput, args.stages, gpu_price, token_price) for r in runs]
        lines.append(f"| {labels[key]} | {tps:.1f} | {tps * 3600 / 1e6 * token_price:.2f} "
                     f"| {args.stages * gpu_price:.2f} | {spread(margins, '{:.0%}')} |")
    return [*lines, ""]


def plain_section(cells, labels) -> list[str]:
    """What each ablation changes, said plainly: measurable only when the spreads part."""
    lines = ["## What each technique adds here", ""]
    c_runs = [r.throughput for r in ok_runs(cells, "c", "decode")]
    for key, technique in (("c-fifo", "link scheduling"), ("c-priority", "just-in-time chunking"),
                           ("c-stages-mb", "measured micro-batching"),
                           ("c-no-stall", "the decode-stall bound")):
        runs = [r.throughput for r in ok_runs(cells, key, "decode")]
        if not runs or not c_runs:
            continue
        if min(c_runs) > max(runs):
            verdict = f"adds {statistics.median(c_runs) / statistics.median(runs) - 1:+.1%}"
        elif max(c_runs) < min(runs):
            verdict = f"costs {1 - statistics.median(c_runs) / statistics.median(runs):.1%}"
        else:
            verdict = "adds nothing measurable (the runs' ranges overlap)"
        lines.append(f"- decode-heavy, {technique} ({labels[key]} vs (c)): {verdict}.")
    for key, technique in (("c-fifo", "link scheduling"), ("c-priority", "just-in-time chunking"),
                           ("c-no-stall", "the decode-stall bound")):
        verdicts = [_p99_verdict(name, [pick(r) for r in ok_runs(cells, "c", "mixed") if pick(r)],
                                 [pick(r) for r in ok_runs(cells, key, "mixed") if pick(r)])
                    for name, pick in (("ITL p99", lambda r: r.itl and r.itl[1]),
                                       ("TTFT p99", lambda r: r.ttft and r.ttft[1]))]
        if all(verdicts):
            lines.append(f"- mixed, {technique}: {'; '.join(verdicts)}.")
    return [*lines, ""]


def _p99_verdict(name: str, base: list[float], without: list[float]) -> str:
    """What (c) does to a latency against the system without the technique."""
    if not base or not without:
        return ""
    if max(base) < min(without):
        return f"lowers {name} {1 - statistics.median(base) / statistics.median(without):.0%} (ranges apart)"
    if min(base) > max(without):
        return f"raises {name} {statistics.median(base) / statistics.median(without) - 1:.0%} (ranges apart)"
    return f"changes {name} by nothing measurable (the runs' ranges overlap)"


def main(argv=None) -> int:
    args = parse_args(argv)
    timing = make_timing(args)
    started = time.perf_counter()
    try:
        cells, regime, fit, tuning = asyncio.run(run(args, timing))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text, headline = render(args, timing, cells, regime, fit, tuning,
                            time.perf_counter() - started)
    print(text, flush=True)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "weak_links_headline.md").write_text(text)
        print(f"wrote {RESULTS / 'weak_links_headline.md'}", flush=True)
    print(json.dumps(headline), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
