"""Real compute, the CLI as a user runs it: auto micro-batching against one micro-batch, and
what long prompts do to short streams' inter-token gaps (issue 19's real-CPU check).

    python -m benchmarks.stall_free                # about 25 minutes on 2 cores
    python -m benchmarks.stall_free --quick        # about 8 minutes

Three stages on this machine: ``molink serve --layers 0:2`` and two ``molink join`` (2:4,
4:6) of the benchmarks' random Llama (hidden 256, 6 layers, vocab 8,000, 4,096 positions,
saved in float32, which ``--dtype auto`` keeps; ``--dtype`` sets every node's), one thread
each; a relay
(``benchmarks.weak_links.relay``, the project's LinkEmulator) at ``--link`` in front of
every node that receives activations (stage 2, stage 3, the head's result port); streamed
``/v1/completions`` from one client (``benchmarks.peers.client``). Every process is
stopped by its pid, also when the run fails or is interrupted.

1. **Micro-batching**: 32 client streams, each sending requests of 48 output tokens
   (32-token prompts) one after another: default flags against ``--num-microbatches 1``,
   interleaved, ``--repeats`` each; output tokens/s in a 30 s window after 25 s of the same
   load (a server runs for hours: what auto settles on counts, not its first seconds);
   ``--counts 2 3`` adds fixed counts; the machine's CPU busy share in the window.
2. **Stalls**: default flags; 8 short streams decode throughout; a quiet window, then one
   as long in which a 1,500-token prompt arrives every 2 s; the short streams'
   inter-token gaps inside each window (p50, p99) and the loaded / quiet ratio. Then the
   same with a tighter bound (``--decode-stall-factor 1``; the default is 2) and with the
   bound off (``0``): what the bound buys in inter-token gaps and what it costs the long
   prompts' TTFT.

The bound each number is measured against (without ``--own-cpus``): one machine's cores
shared by 3 stage processes, the head's HTTP server, 3 relays and the client (so a stage
that computes a prefill takes cores from the decodes: some growth under load is the
machine, not a stall). ``--own-cpus`` gives each stage process CPUs of its own instead.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.peers.client import (
    REQUEST_TIMEOUT_S,
    Trace,
    make_prompts,
    measure,
    request_body,
    stream_one,
    warm_up,
)
from benchmarks.peers.clusters import MODEL_NAME, MolinkPipeline, Setup
from benchmarks.peers.processes import own_cpus
from benchmarks.peers.report import lscpu
from benchmarks.weak_links.measurement import machine_busy_seconds

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "stall_free.md"
SYSTEMS = {"default": [], "one micro-batch": ["--num-microbatches", "1"],
           "no stall bound": ["--decode-stall-factor", "0"],
           "stall factor 1": ["--decode-stall-factor", "1"]}


def log(message: str) -> None:
    print(f"[stall_free] {message}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link", default="100mbit:20ms")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=1, help="per node")
    parser.add_argument("--own-cpus", action="store_true",
                        help="each node on --threads + 1 CPUs of its own (as on separate hosts); "
                             "the client and relays on the rest (default: every process may "
                             "use every CPU)")
    parser.add_argument("--dtype", default="auto",
                        help="every node's --dtype (auto: the checkpoint's, float32 here)")
    parser.add_argument("--counts", type=int, nargs="*", default=[],
                        help="part 1: fixed micro-batch counts run beside default and one")
    parser.add_argument("--streams", type=int, default=32, help="part 1: streams at once")
    parser.add_argument("--warmup", type=float, default=25.0,
                        help="part 1: seconds of streaming before the window")
    parser.add_argument("--window", type=float, default=30.0, help="part 1: measured seconds")
    parser.add_argument("--output-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short-streams", type=int, default=8)
    parser.add_argument("--long-prompt", type=int, default=1500)
    parser.add_argument("--long-every", type=float, default=2.0)
    parser.add_argument("--long-count", type=int, default=6)
    parser.add_argument("--stall-systems", nargs="+",
                        default=["default", "stall factor 1", "no stall bound"],
                        choices=list(SYSTEMS))
    parser.add_argument("--parts", nargs="+", default=["microbatching", "stalls"],
                        choices=["microbatching", "stalls"])
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, 10 s warm-up and window, one stall system")
    parser.add_argument("--server-log-level", default=None, help="the head's --log-level")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.window, args.stall_systems = 1, 10.0, 10.0, \
            args.stall_systems[:1]
    return args


def model_dir(args) -> Path:
    from benchmarks.random_llama import build_model

    directory = Path(tempfile.gettempdir()) / (
        f"molink-stall-free-llama-h{args.hidden}-l{args.layers}-v{args.vocab}")
    if not (directory / "complete").exists():
        log(f"building the random Llama in {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        build_model(directory, args.hidden, args.layers, args.vocab, max_position_embeddings=4096)
        (directory / "complete").write_text("ok")
    return directory


@dataclass
class Row:
    part: str
    system: str
    values: dict = field(default_factory=dict)
    error: str = ""


def gaps_in(traces: list[Trace], start: float, end: float) -> list[float]:
    """Inter-token gaps (between consecutive streamed chunks of one request) that end
    inside [start, end)."""
    gaps = []
    for trace in traces:
        times = trace.chunk_times
        gaps += [b - a for a, b in itertools.pairwise(times) if start <= b < end]
    return gaps


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def busy_percent(busy_s: float, elapsed_s: float, cpus: frozenset[int] = frozenset()) -> float:
    """Share of the cores' time spent busy: ``busy_s`` (``machine_busy_seconds``
    difference) over ``elapsed_s`` on ``cpus`` (empty: all of this machine's cores)."""
    cores = len(cpus) or os.cpu_count() or 1
    return float("nan") if elapsed_s <= 0 else 100 * busy_s / (elapsed_s * cores)


def system_options(system: str) -> list[str]:
    """The head's options for a system: a named one, or ``N micro-batches`` (``--counts``)."""
    if system in SYSTEMS:
        return SYSTEMS[system]
    return ["--num-microbatches", system.split()[0]]


async def metric(base_url: str, name: str) -> float | None:
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            text = (await client.get(f"{base_url}/metrics")).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def with_cluster(setup: Setup, args, options: list[str], work):
    log_dir = Path(tempfile.mkdtemp(prefix="cluster-", dir=setup.log_dir))
    if args.server_log_level:
        options = [*options, "--log-level", args.server_log_level]
    nodes = [] if args.dtype == "auto" else ["--dtype", args.dtype]
    cluster = MolinkPipeline(setup, args.link, log_dir, nodes, args.layers, head_options=options)
    try:
        await cluster.start()
        await warm_up(cluster.base_url, MODEL_NAME)
        return await work(cluster)
    finally:
        await cluster.stop()


async def streaming(client: httpx.AsyncClient, url: str, index: int, max_tokens: int,
                    traces: list[Trace], stop: asyncio.Event) -> None:
    """One client stream: a request of ``max_tokens`` after another until ``stop``."""
    prompt = make_prompts(1, 32, seed=100 + index)[0]
    while not stop.is_set():
        trace = Trace()
        traces.append(trace)
        await stream_one(client, url, request_body(MODEL_NAME, prompt, max_tokens), trace)
        if trace.error:
            return


async def microbatching(setup: Setup, args, system: str) -> Row:
    async def work(cluster):
        # The bound: every token of a request crosses the whole pipeline (3 links and 3
        # stages), so no micro-batch count beats `streams / single-stream TPOT` tokens/s.
        single = await measure(cluster.base_url, MODEL_NAME, make_prompts(2, 32, seed=2),
                               args.output_tokens, 1)
        traces: list[Trace] = []
        stop = asyncio.Event()
        url = f"{cluster.base_url}/v1/completions"
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=args.streams + 4),
                                     timeout=REQUEST_TIMEOUT_S) as client:
            tasks = [asyncio.create_task(streaming(client, url, i, args.output_tokens, traces,
                                                   stop)) for i in range(args.streams)]
            await asyncio.sleep(args.warmup)  # a long-running server: auto has settled
            cpus = frozenset().union(*setup.cpus)  # the nodes' (pinned), else the machine's
            start, busy_before = time.perf_counter(), machine_busy_seconds(cpus)
            await asyncio.sleep(args.window)
            end, busy_after = time.perf_counter(), machine_busy_seconds(cpus)
            chosen = await metric(cluster.base_url, "molink_microbatches_target")
            stop.set()
            await asyncio.gather(*tasks)
        done = [t for t in traces if not t.error and t.num_chunks]
        tokens_per_chunk = sum(t.num_tokens for t in done) / sum(t.num_chunks for t in done)
        events = sum(start <= c < end for t in done for c in t.chunk_times)
        gaps = gaps_in(done, start, end)
        return Row("microbatching", system, {
            "tok/s": events * tokens_per_chunk / (end - start),
            "bound tok/s": args.streams / single.p50("tpot_s"),
            "ITL p50 ms": 1e3 * p(gaps, 0.5), "ITL p99 ms": 1e3 * p(gaps, 0.99),
            "micro-batches": chosen,
            "CPU busy %": busy_percent(busy_after - busy_before, end - start, cpus),
            "errors": sum(1 for t in traces if t.error)})
    return await with_cluster(setup, args, system_options(system), work)


async def stalls(setup: Setup, args, system: str) -> Row:
    async def work(cluster):
        url = f"{cluster.base_url}/v1/completions"
        short_traces: list[Trace] = []
        long_traces: list[Trace] = []
        limits = httpx.Limits(max_connections=args.short_streams + args.long_count + 4)
        async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
            stop = asyncio.Event()

            tasks = [asyncio.create_task(streaming(client, url, i, 1000, short_traces, stop))
                     for i in range(args.short_streams)]
            window = args.long_count * args.long_every + 2.0
            await asyncio.sleep(5.0)  # every stream decoding, the micro-batch count settled
            quiet = (time.perf_counter(), time.perf_counter() + window)
            await asyncio.sleep(window)
            loaded = (time.perf_counter(), time.perf_counter() + window)
            prompts = make_prompts(args.long_count, args.long_prompt, seed=7)
            longs = []
            for i, prompt in enumerate(prompts):
                trace = Trace()
                long_traces.append(trace)
                longs.append(asyncio.create_task(stream_one(
                    client, url, request_body(MODEL_NAME, prompt, 8), trace)))
                if i + 1 < len(prompts):
                    await asyncio.sleep(args.long_every)
            await asyncio.sleep(max(0.0, loaded[1] - time.perf_counter()))
            await asyncio.gather(*longs)
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        quiet_gaps, loaded_gaps = (gaps_in(short_traces, *w) for w in (quiet, loaded))
        errors = [t.error for t in short_traces + long_traces if t.error]
        return Row("stalls", system, {
            "quiet ITL p50 ms": 1e3 * p(quiet_gaps, 0.5), "quiet ITL p99 ms": 1e3 * p(quiet_gaps, 0.99),
            "loaded ITL p50 ms": 1e3 * p(loaded_gaps, 0.5),
            "loaded ITL p99 ms": 1e3 * p(loaded_gaps, 0.99),
            "p99 loaded / quiet": p(loaded_gaps, 0.99) / p(quiet_gaps, 0.99),
            "long TTFT p50 s": statistics.median(t.ttft_s for t in long_traces
                                                 if t.first is not None) if any(
                t.first is not None for t in long_traces) else float("nan"),
            "gaps": f"{len(quiet_gaps)} / {len(loaded_gaps)}", "errors": len(errors)})
    return await with_cluster(setup, args, SYSTEMS[system], work)


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def table(rows: list[Row], part: str) -> list[str]:
    rows = [r for r in rows if r.part == part]
    if not rows:
        return []
    keys = list(next((r.values for r in rows if r.values), {}).keys())
    lines = ["| system | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        cells = [fmt(r.values.get(k, "")) for k in keys] if not r.error else [r.error] + [""] * (
            len(keys) - 1)
        lines.append(f"| {r.system} | " + " | ".join(cells) + " |")
    return lines


def summary(rows: list[Row]) -> list[str]:
    lines = []
    by = {}
    for r in rows:
        if not r.error:
            by.setdefault((r.part, r.system), []).append(r.values)
    default = [v["tok/s"] for v in by.get(("microbatching", "default"), [])]
    one = [v["tok/s"] for v in by.get(("microbatching", "one micro-batch"), [])]
    if default and one:
        ratios = [a / b for a, b in zip(default, one)]
        lines.append(f"- Micro-batching: default / `--num-microbatches 1` = "
                     f"**{statistics.median(ratios):.2f}x** [{min(ratios):.2f}-{max(ratios):.2f}] "
                     f"(pairs run side by side; target >= 1.3x)")
        bounds = [v["bound tok/s"] for v in by[("microbatching", "default")]]
        share = [a / b for a, b in zip(default, bounds)]
        ceiling = [b / o for b, o in zip(bounds, one)]
        for system in sorted({s for p, s in by if p == "microbatching"} - {"default"}
                             - {"one micro-batch"}):
            fixed = [a / b for a, b in zip((v["tok/s"] for v in by[("microbatching", system)]),
                                           one)]
            lines.append(f"- {system} / `--num-microbatches 1` = "
                         f"{statistics.median(fixed):.2f}x [{min(fixed):.2f}-{max(fixed):.2f}]")
        lines.append(f"- Default at {100 * statistics.median(share):.0f} % of its bound "
                     f"(streams / single-stream TPOT); the most any count could give over one "
                     f"micro-batch here: {statistics.median(ceiling):.2f}x")
    for system in SYSTEMS:
        values = by.get(("stalls", system))
        if values:
            ratios = [v["p99 loaded / quiet"] for v in values]
            lines.append(f"- Stalls, {system}: short streams' ITL p99 with long prompts / without "
                         f"= **{statistics.median(ratios):.2f}x** (target <= 2x)")
    return lines


def dtype_note(dtype: str) -> str:
    from molink.model.loader import cpu_lacks_native_bf16

    native = "no native bfloat16" if cpu_lacks_native_bf16() else "native bfloat16 (AVX512-BF16/AMX)"
    chosen = "float32 (`--dtype auto`: the checkpoint's)" if dtype == "auto" else f"`--dtype {dtype}`"
    return f"{chosen}; this CPU: {native}"


def threads_note(args) -> str:
    each = f"{args.threads} thread(s) each"
    return f"{each}, on CPUs of its own (`--own-cpus`)" if args.own_cpus else each


def machine_note(args) -> str:
    cores = os.cpu_count() or 1
    if args.own_cpus:
        return (f"Machine: {cores} cores; each stage process on {args.threads + 1} of its own "
                "(`sched_setaffinity`: its compute threads + one for its event loop, gRPC and "
                "serializer threads), the client and relays on the rest, so stages compete "
                "for no core (memory bandwidth and caches are still shared). CPU busy: the "
                "stages' cores.")
    return (f"Machine: {cores} cores shared by 3 stage processes, the head's HTTP server, 3 "
            "relays and the client; compute spent on a prefill is taken from the decodes "
            "whatever the schedule, so only the stall beyond that share is the scheduler's.")


def write_report(args, command: str, rows: list[Row], elapsed_s: float) -> str:
    lines = [
        "# Stall-free stages and auto micro-batching on real compute (CLI)", "",
        (f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{elapsed_s / 60:.0f} minutes)"), "",
        (f"Model: random Llama (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), "
        f"{dtype_note(args.dtype)}. `molink serve --layers 0:{args.layers // 3}` + two "
        f"`molink join` on this machine, {threads_note(args)}; a relay at "
        f"{args.link} in front of stage 2, stage 3 and the head's result port."), "",
        (f"Micro-batching: {args.streams} client streams, each sending requests of "
        f"{args.output_tokens} output tokens (32-token prompts) one after another; output "
        f"tokens/s in a {args.window:g} s window after {args.warmup:g} s of the same load; "
        "repeats interleaved. Bound: streams / single-stream TPOT (each token crosses the "
        "whole pipeline, so no micro-batch count does better)."), "",
        (f"Stalls: {args.short_streams} short streams decode throughout; a quiet window of "
        f"{args.long_count * args.long_every + 2:.0f} s, then one as long with a "
        f"{args.long_prompt}-token prompt (8 output tokens) every {args.long_every:g} s "
        f"({args.long_count} in all). ITL: gaps between a stream's consecutive chunks ending "
        "in the window."), "",
        machine_note(args), "",
        "## Summary", "", *summary(rows), "",
        "## Micro-batching", "", *table(rows, "microbatching"), "",
        "## Stalls", "", *table(rows, "stalls"), "",
        "## Machine", "", "```", lscpu().rstrip(), "```", ""]
    return "\n".join(lines)


async def run(args, setup: Setup, on_row) -> list[Row]:
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    rows: list[Row] = []
    jobs = []
    for repeat in range(args.repeats):
        if "microbatching" in args.parts:
            order = ["default", "one micro-batch", *(f"{n} micro-batches" for n in args.counts)]
            jobs += [(microbatching, s) for s in (order if repeat % 2 == 0 else order[::-1])]
        if "stalls" in args.parts:
            jobs += [(stalls, s) for s in args.stall_systems]
    for i, (job, system) in enumerate(jobs):
        log(f"[{i + 1}/{len(jobs)}] {job.__name__}: {system}")
        try:
            row = await job(setup, args, system)
        except Exception as exc:  # noqa: BLE001 - one broken run is reported, the rest go on
            row = Row(job.__name__, system, error=f"{type(exc).__name__}: {exc}"[:300])
        log(f"    {row.values or row.error}")
        rows.append(row)
        on_row(rows)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.stall_free " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    setup = Setup(model_dir(args), None, args.threads, max(args.streams, args.short_streams
                                                           + args.long_count) + 4,
                  args.long_prompt + 1024 + 64, Path(tempfile.mkdtemp(prefix="molink-stall-")),
                  cpus=own_cpus(3, args.threads) if args.own_cpus else ())
    log(f"server logs under {setup.log_dir}")

    def write(rows: list[Row]) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(write_report(args, command.strip(), rows,
                                         time.perf_counter() - started))

    try:
        rows = asyncio.run(run(args, setup, write))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    print("\n".join(summary(rows)), flush=True)
    log(f"wrote {args.out}")
    return 0 if not any(r.error for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
