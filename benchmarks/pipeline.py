"""Generated tokens/s of a 3-stage local pipeline: 1 micro-batch in flight versus ``auto``.

The head serves the first layer range in this process; two ``molink join`` processes serve
the rest on 127.0.0.1. The same pipeline (same processes, same model) runs the same
workload with ``num_microbatches`` = 1, then ``auto`` (stages + 1), then 1 again, so the
ratio is measured side by side.

The bound: overlapping micro-batches can at best hide the time of every resource but the
busiest. On one CPU machine the three stage processes share its cores, so the gain over one
micro-batch at a time is bounded by min(number of stages, number of cores); the benchmark
prints that bound next to the measured ratio.

    python -m benchmarks.pipeline            # writes benchmarks/results/pipeline.md
    python -m benchmarks.pipeline --quick    # smaller, prints only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.random_llama import build_model
from molink import SamplingParams
from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.pipeline_head import PipelineHead
from molink.entrypoints.local_pipeline import LocalPipeline
from molink.scheduler.placement import split_layers
from molink.transport.peers import PeerSecurity

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "benchmark-token"
NUM_STAGES = 3


def local_pipeline(directory: Path, layers: int, threads: int) -> LocalPipeline:
    """The head serves the first range here; a ``molink join`` process serves each other."""
    ranges = split_layers(layers, NUM_STAGES)
    torch.set_num_threads(threads)
    head = PipelineHead(ModelConfig(model=str(directory), dtype="float32", device="cpu"),
                        CacheConfig(block_size=16), SchedulerConfig(max_num_seqs=256),
                        HeadConfig(head_layers=ranges[0]), security=PeerSecurity.create(TOKEN))
    return LocalPipeline(head, TOKEN, directory, ranges[1:],
                         join_options=["--dtype", "float32", "--device", "cpu"],
                         env={"OMP_NUM_THREADS": str(threads)})


async def run_workload(head: PipelineHead, num_requests: int, prompt_len: int,
                       output_len: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    async def one(i: int) -> int:
        prompt = [(7 * i + j) % 1000 + 6 for j in range(prompt_len)]
        final = None
        async for final in head.generate(prompt, params):
            pass
        return len(final.outputs[0].token_ids)

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(num_requests)))
    return time.perf_counter() - start, sum(counts)


async def main_async(args) -> list[tuple[str, int, float, float, int]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = build_model(Path(tmp), args.hidden, args.layers, args.vocab)
        async with local_pipeline(directory, args.layers, args.threads) as pipe:
            head = pipe.head
            print(f"pipeline: {head.describe()}", flush=True)
            await run_workload(head, 4, 8, 4)  # warm-up
            settings = [("1 micro-batch", 1), ("auto", None)]
            settings += [(f"{n} micro-batches", n) for n in args.also] + [("1 micro-batch", 1)]
            for label, option in settings:
                head.num_microbatches_option = option
                seconds, tokens = await run_workload(head, args.requests, args.prompt_len,
                                                     args.output_len)
                rows.append((label, head.num_microbatches, seconds, tokens / seconds,
                             head.stats.max_microbatches_in_flight))
                print(f"{label:>14}: {head.num_microbatches} in flight, {seconds:.2f} s, "
                      f"{tokens / seconds:.1f} tokens/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 3),
                        help="torch threads per process (default: cores // 3, so the three "
                             "stages do not oversubscribe the cores when they overlap)")
    parser.add_argument("--also", type=int, nargs="*", default=[],
                        help="further fixed micro-batch counts to measure in the same run")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.output_len = 16, 16
    rows = asyncio.run(main_async(args))
    sequential = (rows[0][3] + rows[-1][3]) / 2
    cores = os.cpu_count() or 1
    bound = min(3, cores)
    table = ["| setting | micro-batches in flight | wall s | tokens/s |", "|---|---:|---:|---:|"]
    table += [f"| {label} | {n} | {s:.2f} | {tps:.1f} |" for label, n, s, tps, _ in rows]
    summary = (f"\n**auto vs 1 micro-batch (mean of the two 1-micro-batch runs): "
               f"{rows[1][3] / sequential:.2f}x**; bound on this machine: {bound}x "
               f"(3 stages sharing {cores} cores).")
    text = "\n".join(table) + "\n" + summary
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        command = "python -m " + " ".join(shlex.quote(a) for a in ["benchmarks.pipeline",
                                                                   *sys.argv[1:]])
        (RESULTS / "pipeline.md").write_text(
            f"# 3-stage local pipeline: 1 micro-batch vs auto\n\nCommand: `{command}`\n\n"
            f"Model: random Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, "
            f"fp32, CPU, {args.threads} torch thread(s) per process. Head serves layers "
            f"0:{split_layers(args.layers, NUM_STAGES)[0][1]}; two `molink join` processes "
            f"serve the rest on 127.0.0.1. Workload: {args.requests} requests, prompt "
            f"{args.prompt_len} tokens, {args.output_len} output tokens each, greedy.\n\n"
            + text + "\n")
        print(f"wrote {RESULTS / 'pipeline.md'}")


if __name__ == "__main__":
    main()
