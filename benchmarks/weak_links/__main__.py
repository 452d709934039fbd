"""``python -m benchmarks.weak_links``: the options, then the grid, the bound, the report."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import weak_links
from benchmarks.weak_links.grid import run_all
from benchmarks.weak_links.plots import write_plots
from benchmarks.weak_links.report import RESULTS, bounds_of, summary, write_report
from benchmarks.weak_links.systems import LINKS, STAGE_COUNTS, SYSTEMS, Timing
from molink.runtime.device_profile import GPUS
from molink.transport.link_emulator import LinkSpec


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weak_links",
                                     description=weak_links.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="emulated 3 stages 100mbit:20ms ((a) decode-heavy, (b) mixed, (c) "
                             "both) + CPU (c) decode-heavy; short windows; prints only")
    parser.add_argument("--regime", choices=["emulated", "cpu", "both"], default="both")
    parser.add_argument("--stages", type=int, nargs="+", default=list(STAGE_COUNTS))
    parser.add_argument("--links", nargs="+", default=list(LINKS))
    parser.add_argument("--workloads", nargs="+", choices=["decode", "mixed"],
                        default=["decode", "mixed"])
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=None,
                        help="only these systems (default: a b c, plus the ablations at the "
                             "target setting)")
    parser.add_argument("--full-grid", action="store_true",
                        help="every workload and ablation on every setting (hours); default: "
                             "mixed only at 3 stages over 1gbit/100mbit (emulated) and at the "
                             "target (CPU), CPU only at 3 stages")
    parser.add_argument("--model", default="qwen2.5-32b", choices=["qwen2.5-32b", "llama-2-70b"],
                        help="emulated model (config under benchmarks/configs/)")
    parser.add_argument("--quantization", default="int4", choices=["int4", "int8", "none"],
                        help="emulated stages' weights (in bf16 a third of Qwen2.5-32B and "
                             "its embeddings leave a 24 GiB card no room for the KV cache)")
    parser.add_argument("--device-profile", default="rtx3090",
                        help="emulated stages' profile: rtx3090 | rtx4090 | a100-80gb | "
                             "published | file.json")
    parser.add_argument("--concurrency", type=int, default=512,
                        help="decode-heavy requests, emulated regime")
    parser.add_argument("--cpu-concurrency", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16,
                        help="decode-heavy prompt tokens (short: the sequential system pushes "
                             "every prompt through every link one micro-batch at a time)")
    parser.add_argument("--load", type=float, default=0.5,
                        help="mixed: offered load as a fraction of (b)'s capacity")
    parser.add_argument("--cpu-hidden", type=int, default=1024)
    parser.add_argument("--cpu-layers", type=int, default=12)
    parser.add_argument("--cpu-vocab", type=int, default=2048)
    parser.add_argument("--cpu-kv-blocks", type=int, default=6144)
    parser.add_argument("--decode-window", type=float, default=None)
    parser.add_argument("--mixed-requests", type=int, default=None)
    args = parser.parse_args(argv)
    if args.concurrency < 128 or args.cpu_concurrency < 128:
        parser.error("decode-heavy needs at least 128 concurrent requests (issue #8)")
    return args


def validate(args) -> None:
    """Fail fast on options a pipeline would only reject minutes into the run."""
    for link in args.links:
        LinkSpec.parse(link)
    if args.device_profile not in GPUS and args.device_profile != "published" \
            and not Path(args.device_profile).is_file():
        raise ValueError(f"--device-profile {args.device_profile!r} is neither a GPU "
                         f"({', '.join(GPUS)}), 'published' nor a JSON file")
    if any(n < 2 for n in args.stages):
        raise ValueError("--stages: at least 2 (a link needs two ends)")


def is_default_grid(args) -> bool:
    """Whether the command ran the default grid (written to weak_links.md) or a subset."""
    return args == parse_args(["--full-grid"] if args.full_grid else [])


def make_timing(args) -> Timing:
    if args.quick:
        timing = Timing(decode_window_s=6, decode_window_max_s=30, settle_s=1,
                        first_token_timeout_s=90, mixed_requests=16, mixed_drain_s=30,
                        mixed_output_cap=64)
    else:
        timing = Timing(decode_window_s=8, decode_window_max_s=90, settle_s=1,
                        first_token_timeout_s=240, mixed_requests=32, mixed_drain_s=90,
                        mixed_output_cap=128)
    if args.decode_window:
        timing = dataclasses.replace(timing, decode_window_s=args.decode_window)
    if args.mixed_requests:
        timing = dataclasses.replace(timing, mixed_requests=args.mixed_requests)
    return timing


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        validate(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    timing = make_timing(args)
    started = time.perf_counter()
    results, regimes = asyncio.run(run_all(args, timing))
    bounds = bounds_of(results, regimes, args)
    headline = summary(results, bounds)
    elapsed = time.perf_counter() - started
    report = write_report(args, timing, results, regimes, bounds, headline, elapsed)
    print("\n## Headline" + report.split("## Headline", 1)[1], flush=True)
    if not args.quick:
        # A filtered run must not overwrite the default grid's results (40 minutes' worth).
        stem = "weak_links" if is_default_grid(args) else "weak_links_partial"
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{stem}.md").write_text(report)
        print(f"wrote {RESULTS / f'{stem}.md'}", flush=True)
        for path in write_plots(results, bounds, stem):
            print(f"wrote {path}", flush=True)
    print(f"total {elapsed:.0f} s", flush=True)
    print(json.dumps(headline), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
