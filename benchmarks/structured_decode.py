"""Per-token cost of grammar-constrained decoding against unconstrained, side by side.

The bundled model (``molink/assets/default_model``, float32, CPU), the same 8 prompts,
greedy, EOS ignored, the same number of output tokens, first with no constraint, then held
to a regular expression that never completes (``[a-z ,.]+``: every step is masked), then
unconstrained again; in one process (``LLM``) and over 3 stages (the head computes the
first range, two ``molink join`` processes the rest; the mask is applied on the last
stage). Reported: decode time per token (TPOT) of one request at a time and tokens/s of 8
at once; the bound is the unconstrained rows of the same run (the mean of the two).

    python -m benchmarks.structured_decode            # writes benchmarks/results/structured_decode.md
    python -m benchmarks.structured_decode --quick    # fewer tokens, prints only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from molink import LLM, SamplingParams
from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.pipeline_head import PipelineHead
from molink.entrypoints.local_pipeline import LocalPipeline
from molink.model.loader import load_config
from molink.sampling_params import StructuredOutputsParams
from molink.scheduler.placement import split_layers
from molink.transport.peers import PeerSecurity

MODEL = Path(__file__).resolve().parents[1] / "molink" / "assets" / "default_model"
RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "benchmark-token"
REGEX = "[a-z ,.]+"
PROMPTS = ["The history of", "In Python, a list is", "Once upon a time", "The weather today",
           "A recipe for bread", "My favourite book", "The best way to learn", "On the moon"]
SETTINGS = (("unconstrained", None), ("regex-constrained", REGEX), ("unconstrained", None))


def _params(regex: str | None, tokens: int) -> SamplingParams:
    structured = StructuredOutputsParams(regex=regex) if regex else None
    return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True,
                          structured_outputs=structured)


def single_process(tokens: int) -> list[tuple[str, float, float]]:
    llm = LLM(model=str(MODEL), dtype="float32", device="cpu")
    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tokenizer.encode(p)} for p in PROMPTS]
    llm.generate(prompts[:1], _params(REGEX, 4))  # warm-up, grammar compiled
    rows = []
    for label, regex in SETTINGS:
        start = time.perf_counter()
        llm.generate(prompts[:1], _params(regex, 1))
        first = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate(prompts[:1], _params(regex, tokens + 1))
        tpot = (time.perf_counter() - start - first) / tokens
        start = time.perf_counter()
        llm.generate(prompts, _params(regex, tokens))
        rows.append((label, tpot, len(prompts) * tokens / (time.perf_counter() - start)))
    return rows


async def three_stages(tokens: int, threads: int) -> list[tuple[str, float, float]]:
    ranges = split_layers(load_config(str(MODEL)).arch.num_layers, 3)
    head = PipelineHead(ModelConfig(model=str(MODEL), dtype="float32", device="cpu"),
                        CacheConfig(block_size=16), SchedulerConfig(max_num_seqs=64),
                        HeadConfig(head_layers=ranges[0], compression="none"),
                        security=PeerSecurity.create(TOKEN))
    async with LocalPipeline(head, TOKEN, MODEL, ranges[1:],
                             join_options=["--dtype", "float32", "--device", "cpu"],
                             env={"OMP_NUM_THREADS": str(threads)}) as pipe:
        prompts = [pipe.head.tokenizer.encode(p) for p in PROMPTS]
        await _generate(pipe.head, prompts[:1], _params(REGEX, 4))  # warm-up
        rows = []
        for label, regex in SETTINGS:
            first = await _generate(pipe.head, prompts[:1], _params(regex, 1))
            one = await _generate(pipe.head, prompts[:1], _params(regex, tokens + 1))
            batch = await _generate(pipe.head, prompts, _params(regex, tokens))
            rows.append((label, (one - first) / tokens, len(prompts) * tokens / batch))
        return rows


async def _generate(head: PipelineHead, prompts, params: SamplingParams) -> float:
    async def one(prompt):
        async for _ in head.generate(prompt, params):
            pass

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - start


def _table(name: str, rows) -> list[str]:
    base_tpot = (rows[0][1] + rows[2][1]) / 2
    base_tps = (rows[0][2] + rows[2][2]) / 2
    lines = [f"**{name}** (bound: the mean of the two unconstrained rows)", "",
             "| setting | TPOT ms (1 request) | x unconstrained | tokens/s (8 at once) | "
             "x unconstrained |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {label} | {tpot * 1e3:.1f} | {tpot / base_tpot:.2f} | {tps:.1f} | "
              f"{tps / base_tps:.2f} |" for label, tpot, tps in rows]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 output tokens, prints only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per stage process (default: 1)")
    args = parser.parse_args()
    tokens = 16 if args.quick else 64
    print("single process ...", file=sys.stderr, flush=True)
    lines = _table("one process", single_process(tokens))
    print("3 stages ...", file=sys.stderr, flush=True)
    lines += _table("3 stages (head + 2 molink join)", asyncio.run(three_stages(tokens,
                                                                                args.threads)))
    text = "\n".join(lines)
    print(text)
    if args.quick:
        return
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    command = "python -m benchmarks.structured_decode" + (
        f" --threads {args.threads}" if args.threads != 1 else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structured_decode.md").write_text("\n".join([
        "# Grammar-constrained decoding: per-token cost against unconstrained", "",
        f"Command: `{command}` ({os.cpu_count()} cores)", "",
        f"Model: the bundled default model, float32 on CPU; {len(PROMPTS)} prompts, {tokens} "
        f"output tokens, greedy, EOS ignored; constrained = `guided_regex` `{REGEX}` (never "
        "complete, so every step is masked, xgrammar). Rows in one run, side by side.", "",
        text, "Machine:", "", "```", lscpu.strip(), "```", ""]))
    print(f"wrote {RESULTS / 'structured_decode.md'}")


if __name__ == "__main__":
    main()
