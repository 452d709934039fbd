"""A token's trip: MoLink's 3-stage pipeline against MoLink in one process, same model, same
dtype, same client, and where the pipeline's extra time goes.

Issue 18's first acceptance point, measured on this machine: with zero-latency links a
3-stage pipeline's single-stream TPOT within single-process TPOT + 3 ms per hop; with 20 ms
links within that + the three one-way latencies; 16 requests at once at >= 0.8x the
single-process tokens/s. The pipeline is ``molink serve --layers 0:4`` + two ``molink join``
on this machine, every hop through a LinkEmulator relay (``benchmarks.weak_links.relay``),
as in ``benchmarks.peers`` (whose clusters, client and ``/metrics`` tables this reuses). The
bound it is measured against: the single-process row of the same run.

    python -m benchmarks.token_trip            # writes benchmarks/results/token_trip.md
    python -m benchmarks.token_trip --quick    # 32 tokens, prints only
    python -m benchmarks.token_trip --repeat 3 # three runs, each side by side; verdict on medians
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.peers import breakdown
from benchmarks.peers.__main__ import PRECISIONS, model_dir
from benchmarks.peers.clusters import MolinkPipeline, Setup
from benchmarks.peers.llama_cpp import DEFAULT_CACHE
from benchmarks.peers.processes import own_cpus
from benchmarks.peers.report import lscpu
from benchmarks.peers.run import Row, Workload, run_row
from molink.transport.link_emulator import LinkSpec

RESULTS = Path(__file__).resolve().parent / "results"
LINKS = ["10gbit:0ms", "10gbit:20ms"]
HOPS = 3
PER_HOP_BUDGET_MS = 3.0
CONCURRENT_FLOOR = 0.8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.token_trip",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="32 output tokens, 1 single request, prints only (default: off)")
    parser.add_argument("--links", nargs="+", default=LINKS,
                        help=f"link regimes, bandwidth:latency (default: {' '.join(LINKS)})")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="16bit",
                        help="MoLink's weights (default: 16bit, bfloat16)")
    parser.add_argument("--threads", type=int, default=1, help="threads per node (default: 1)")
    parser.add_argument("--own-cpus", action="store_true",
                        help="each process on --threads + 1 CPUs of its own, as on separate hosts "
                             "(the one process on the head's); the client and relays on the "
                             "rest (default: every process may use every CPU)")
    parser.add_argument("--concurrency", type=int, default=16, help="default: 16")
    parser.add_argument("--num-microbatches", default="auto", metavar="N|auto",
                        help="the pipeline head's micro-batches in flight (default: auto)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="output tokens (default: 128; --quick 32)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs (one process, then each link), one after another; the "
                             "verdict is on the medians of their side-by-side figures "
                             "(default: 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results page (default: benchmarks/results/token_trip.md; "
                             "--quick: none)")
    args = parser.parse_args(argv)
    args.max_tokens = args.max_tokens or (32 if args.quick else 128)
    if args.out is None and not args.quick:
        args.out = RESULTS / "token_trip.md"
    for link in args.links:
        LinkSpec.parse(link)
    args.hidden, args.layers, args.vocab, args.cache_dir = 1024, 12, 8000, DEFAULT_CACHE
    return args


async def run(args) -> tuple[Row, list[Row]]:
    setup = Setup(model_dir(args), None, args.threads, args.concurrency,
                  128 + args.max_tokens + 64, Path(tempfile.mkdtemp(prefix="molink-trip-")),
                  cpus=own_cpus(HOPS, args.threads) if args.own_cpus else ())
    workload = Workload(128, args.max_tokens, 1 if args.quick else 3, args.concurrency)
    precision = PRECISIONS[args.precision]
    alone = await run_row(setup, Row(None, precision, MolinkPipeline.label), workload, {},
                          args.layers)
    # the pipeline head's own options (one process has no micro-batches to keep in flight)
    setup = dataclasses.replace(setup, head_options=("--num-microbatches",
                                                     str(args.num_microbatches)))
    rows = [await run_row(setup, Row(link, precision, MolinkPipeline.label), workload, {},
                          args.layers) for link in args.links]
    return alone, rows


def met(link: str, per_hop_ms: float, ratio: float) -> bool:
    """Within the per-hop budget, and (zero-latency links) at the concurrent floor."""
    latency = LinkSpec.parse(link).latency_s
    return per_hop_ms <= PER_HOP_BUDGET_MS and (latency > 0 or ratio >= CONCURRENT_FLOOR)


def verdicts(alone: Row, rows: list[Row], concurrency: int) -> list[str]:
    """The acceptance table: each pipeline row against the single process."""
    base_tpot = 1e3 * alone.single.p50("tpot_s")
    base_rate = alone.concurrent.tokens_per_s
    lines = [("| links | TPOT (ms) | allowed (ms) | extra per hop (ms) | "
             f"{concurrency} at once (tok/s) | x one process | met |"),
             "|---|---|---|---|---|---|---|",
             f"| one process | {base_tpot:.1f} | - | - | {base_rate:.1f} | 1.00 | - |"]
    for row in rows:
        if row.error or row.single is None:
            lines.append(f"| {row.link} | failed: {row.error} | | | | | no |")
            continue
        latency_ms = 1e3 * LinkSpec.parse(row.link).latency_s
        tpot = 1e3 * row.single.p50("tpot_s")
        allowed = base_tpot + HOPS * (latency_ms + PER_HOP_BUDGET_MS)
        per_hop, ratio = side_by_side(alone, row)
        lines.append(f"| {row.link} | {tpot:.1f} | {allowed:.1f} | {per_hop:.1f} | "
                     f"{row.concurrent.tokens_per_s:.1f} | {ratio:.2f} | "
                     f"{'yes' if met(row.link, per_hop, ratio) else '**no**'} |")
    return lines


def side_by_side(alone: Row, row: Row) -> tuple[float, float]:
    """A pipeline row against the one process of its run: (single-stream ms a hop beyond
    the link's latency, concurrent tokens/s as a fraction of one process's)."""
    latency_ms = 1e3 * LinkSpec.parse(row.link).latency_s
    tpot, base_tpot = (1e3 * r.single.p50("tpot_s") for r in (row, alone))
    ratio = (row.concurrent.tokens_per_s / alone.concurrent.tokens_per_s if row.concurrent
             else float("nan"))
    return (tpot - base_tpot - HOPS * latency_ms) / HOPS, ratio


def median_verdicts(runs: list[tuple[Row, list[Row]]], concurrency: int) -> list[str]:
    """Each link's side-by-side figures run by run, and the verdict on their medians."""
    lines = [(f"| links | extra per hop (ms), run by run | median | {concurrency} at once x one "
              "process, run by run | median | met (medians) |"),
             "|---|---|---|---|---|---|"]
    for i, link in enumerate(row.link for row in runs[0][1]):
        pairs = [side_by_side(alone, rows[i]) for alone, rows in runs
                 if not rows[i].error and rows[i].single is not None]
        if not pairs:
            lines.append(f"| {link} | failed | | | | no |")
            continue
        hops, ratios = zip(*pairs, strict=True)
        per_hop, ratio = statistics.median(hops), statistics.median(ratios)
        lines.append(f"| {link} | {' / '.join(f'{h:.1f}' for h in hops)} | {per_hop:.1f} | "
                     f"{' / '.join(f'{r:.2f}' for r in ratios)} | {ratio:.2f} | "
                     f"{'yes' if met(link, per_hop, ratio) else '**no**'} |")
    return lines


def cpus_note(args) -> str:
    if not args.own_cpus:
        return ", every process free to use any of this machine's CPUs"
    each = args.threads + 1  # the compute threads + one for the event loop, gRPC, serializers
    return (f", each process pinned to {each} CPUs of its own (`--own-cpus`: the pipeline "
            f"runs on {HOPS * each} of this machine's {os.cpu_count()}, the one process on "
            f"{each}; memory bandwidth and caches shared), the client and relays on the rest")


def page(command: str, args, runs: list[tuple[Row, list[Row]]], seconds: float) -> str:
    options = " ".join(PRECISIONS[args.precision].molink_options)
    lines = ["# A token's trip: 3 stages against one process", "",
             (f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{seconds / 60:.0f} minutes)"), "",
             (f"Model: the benchmarks' random Llama (hidden 1024, 12 layers, GQA 16/4, vocab "
             f"8000, 151M parameters), MoLink `{options}`"
             f", {args.threads} thread(s) per process (OMP_NUM_THREADS){cpus_note(args)}. "
             "One process: `molink "
             "serve` with every layer. Pipeline: `molink serve --layers 0:4` + `molink join` "
             f"4:8 and 8:12 (`--num-microbatches {args.num_microbatches}`), a LinkEmulator "
             "relay in front of stage 2, stage 3 and the head's result port. Workload: "
             "prompts of 128 random token ids, "
             f"{args.max_tokens} output tokens, greedy, `ignore_eos`, streamed "
             "`/v1/completions`; single stream = requests one after another (TPOT p50), "
             f"{args.concurrency} at once = one wave (output tokens / first submission to last "
             "token)."), "",
             (f"Bound: the one-process row. Allowed single-stream TPOT = one process + {HOPS} x "
             f"(link latency + {PER_HOP_BUDGET_MS:.0f} ms); with zero-latency links "
             f"{args.concurrency} at once must reach {CONCURRENT_FLOOR}x one process."), "",
             *tables(runs, args.concurrency)]
    last = f" (run {len(runs)} of {len(runs)})" if len(runs) > 1 else ""
    for row in runs[-1][1]:
        if row.error:
            continue
        lines += [f"## Where the time goes: {row.link}{last}", "", "Single stream:", "",
                  *breakdown.stage_table(row.metrics_single), "",
                  *breakdown.hop_table(row.metrics_single), "",
                  f"{args.concurrency} at once:", "",
                  *breakdown.stage_table(breakdown.since(row.metrics, row.metrics_single)), "",
                  *breakdown.hop_table(breakdown.since(row.metrics, row.metrics_single)), ""]
    lines += ["Machine:", "", "```", lscpu().strip(), "```", ""]
    return "\n".join(lines)


def tables(runs: list[tuple[Row, list[Row]]], concurrency: int) -> list[str]:
    """One run: its acceptance table. Several: each run's, then the medians'."""
    if len(runs) == 1:
        return [*verdicts(*runs[0], concurrency), ""]
    lines = []
    for i, (alone, rows) in enumerate(runs, 1):
        lines += [f"Run {i} of {len(runs)}:", "", *verdicts(alone, rows, concurrency), ""]
    return [*lines, f"Medians of the {len(runs)} runs (the verdict):", "",
            *median_verdicts(runs, concurrency), ""]


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.token_trip " + " ".join(sys.argv[1:] if argv is None
                                                             else argv)
    started = time.perf_counter()
    runs = []
    for i in range(max(1, args.repeat)):
        if args.repeat > 1:
            print(f"run {i + 1} of {args.repeat}", flush=True)
        alone, rows = asyncio.run(run(args))
        if alone.error:
            print(f"the one-process run failed: {alone.error}", file=sys.stderr)
            return 1
        runs.append((alone, rows))
    text = page(command.strip(), args, runs, time.perf_counter() - started)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
