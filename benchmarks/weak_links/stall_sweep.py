"""What the decode-stall bound trades in the headline's mixed workload: TTFT against
inter-token gaps, per ``--decode-stall-factor``.

The headline's mixed workload (200 requests, Poisson arrivals at half of the pipeline's
capacity, every tenth prompt 1,000-2,000 tokens) on its setting (emulated RTX 3090-class
stages, Qwen2.5-32B int4, 3 stages, 100 Mbit/20 ms links), MoLink with each factor and the
FIFO pipeline with ``--fifo-microbatches`` in flight (the count the headline's tuning
picked) as the reference; cells interleaved, ``--repeats`` each, median [min-max].

    python -m benchmarks.weak_links.stall_sweep --factors 2 4 6 0   # ~3 min per cell
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.weak_links import headline
from benchmarks.weak_links.grid import run_job
from benchmarks.weak_links.measurement import RunResult
from benchmarks.weak_links.regimes import emulated_regime
from benchmarks.weak_links.relay import Relays
from benchmarks.weak_links.systems import Job, Setting, System, fifo_with

OUT = headline.RESULTS / "stall_sweep.md"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weak_links.stall_sweep")
    parser.add_argument("--factors", type=float, nargs="+", default=[2.0, 4.0, 6.0, 0.0])
    parser.add_argument("--fifo-microbatches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args, rest = parser.parse_known_args(argv)
    args.headline = headline.parse_args(rest)  # model, link, mixed requests, ...
    return args


def systems(args) -> list[System]:
    molink = [System(f"c{f:g}", f"(c) MoLink, --decode-stall-factor {f:g}"
                     + (" (no bound)" if f == 0 else ""), "auto", "molink", "auto", f)
              for f in args.factors]
    return [fifo_with(args.fifo_microbatches, "b*",
                      f"(b*) FIFO pipeline, {args.fifo_microbatches} micro-batches"), *molink]


async def run(args) -> dict[tuple[str, str], list[RunResult]]:
    """-> cells: (system key, "mixed") -> runs, as the headline keeps them."""
    h = args.headline
    timing = headline.make_timing(h)
    setting = Setting("emulated", h.stages, h.link)
    quantization = None if h.quantization == "none" else h.quantization
    cells: dict[tuple[str, str], list[RunResult]] = {}
    with tempfile.TemporaryDirectory(prefix="molink-stall-sweep-") as tmp:
        regime = emulated_regime(h.model, Path(tmp), h.device_profile, h.concurrency,
                                 quantization)
        relays = Relays(Path(tmp))
        try:
            for repeat in range(args.repeats):
                print(f"\n== repeat {repeat + 1} of {args.repeats}", flush=True)
                for system in systems(args):
                    runs: list[RunResult] = []
                    await run_job(Job(setting, system, ("mixed",)), regime, relays, timing, h,
                                  runs)
                    cells.setdefault((system.key, "mixed"), []).extend(runs)
        finally:
            await relays.stop_all()
    return cells


def render(args, cells: dict[tuple[str, str], list[RunResult]], elapsed_s: float) -> str:
    command = "python -m " + " ".join(shlex.quote(a) for a in [
        "benchmarks.weak_links.stall_sweep", *sys.argv[1:]])
    h = args.headline
    swept = systems(args)
    table = headline.mixed_section(cells, {s.key: s.label for s in swept},
                                   [s.key for s in swept])
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return "\n".join([
        "# The decode-stall bound in the mixed workload: TTFT against inter-token gaps", "",
        (f"Command: `{command}` ({elapsed_s / 60:.1f} min, finished "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"), "",
        (f"Setting: the headline's ({h.model}, {h.quantization} weights, {h.stages} stages "
         f"emulating {h.device_profile}, every link {h.link}); its mixed workload of "
         f"{h.mixed_requests} requests. Runs per cell: {args.repeats} (median [min-max]), "
         "cells interleaved. The bound each number is read against: the FIFO pipeline's row "
         "(no stall bound, prompts cut only to the step's token budget)."), "",
        *table, "## Machine", "", "```", lscpu.strip(), "```", ""])


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        cells = asyncio.run(run(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = render(args, cells, time.perf_counter() - started)
    print(text, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
