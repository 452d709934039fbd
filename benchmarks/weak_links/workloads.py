"""The workloads: decode-heavy (N requests at once, a measured window) and mixed (Poisson
arrivals of ShareGPT-like requests, waited for to the end)."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import os
import random
import time

from benchmarks.weak_links.cluster import Pipeline
from benchmarks.weak_links.measurement import (
    LinkSample,
    RunResult,
    Trace,
    bytes_per_token,
    cpu_percent,
    percentiles,
)
from benchmarks.weak_links.regimes import FIRST_TOKEN_ID, Regime
from benchmarks.weak_links.systems import Setting, Timing
from molink import SamplingParams
from molink.coordinator.pipeline_head import PipelineNotReady, StageUnavailable
from molink.scheduler.placement import split_layers
from molink.transport.link_emulator import LinkSpec


async def consume(head, prompt: list[int], params, trace: Trace) -> None:
    trace.submitted = time.perf_counter()
    count = 0
    try:
        async for out in head.generate(prompt, params):
            now = time.perf_counter()
            num = len(out.outputs[0].token_ids)
            trace.token_times.extend([now] * (num - count))
            count = num
            if out.finished:
                trace.finished = True
    except asyncio.CancelledError:
        raise
    except (PipelineNotReady, StageUnavailable, ValueError, RuntimeError) as exc:
        # a failed request is reported, not fatal to the benchmark
        trace.error = f"{type(exc).__name__}: {exc}"


async def warm_up(head) -> None:
    trace = Trace(4)
    await asyncio.wait_for(consume(head, list(range(FIRST_TOKEN_ID, FIRST_TOKEN_ID + 4)),
                                   SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                   trace), 120)
    if trace.error:
        raise RuntimeError(f"warm-up request failed: {trace.error}")


async def run_decode_heavy(pipe: Pipeline, result: RunResult, timing: Timing,
                           prompt_len: int) -> None:
    """N requests at once; measure a window once every request got its first token."""
    regime = pipe.regime
    rng = random.Random(1)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=min(
        4096, pipe.head.max_model_len - prompt_len - 1))
    traces = [Trace(prompt_len) for _ in range(regime.concurrency)]
    tasks = [asyncio.create_task(consume(
        pipe.head, [rng.randrange(FIRST_TOKEN_ID, regime.prompt_vocab) for _ in range(prompt_len)],
        params, trace)) for trace in traces]
    try:
        deadline = time.perf_counter() + timing.first_token_timeout_s
        while not all(t.token_times or t.error for t in traces):
            if time.perf_counter() > deadline:
                waiting = sum(not t.token_times for t in traces)
                raise TimeoutError(f"{waiting} requests had no first token after "
                                   f"{timing.first_token_timeout_s:.0f} s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(timing.settle_s)
        start, cpu0 = time.perf_counter(), pipe.cpu_snapshot()
        steps0 = pipe.decode_step_totals()
        samples = [pipe.link_sample()]
        # At least the window, and long enough for every request to decode a few tokens in
        # it (a sequential round over 20 Mbit takes seconds), within a limit.
        while not window_done(traces, start, timing):
            await asyncio.sleep(0.1)
            samples.append(pipe.link_sample())
        end, cpu1 = time.perf_counter(), pipe.cpu_snapshot()
        result.library_hops = pipe.describe_hops()
        result.num_microbatches = pipe.microbatches()
        result.stage_step_ms, result.num_rounds = pipe.window_step_ms(steps0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    _record_decode_window(pipe, result, traces, (start, end), samples, prompt_len)
    result.cpu_percent = cpu_percent(cpu0, cpu1, end - start)


def _record_decode_window(pipe: Pipeline, result: RunResult, traces: list[Trace],
                          window: tuple[float, float], samples: list[LinkSample],
                          prompt_len: int) -> None:
    start, end = window
    errors = [t.error for t in traces if t.error]
    if errors:
        result.notes.append(f"{len(errors)} requests failed, e.g. {errors[0]}")
    window = end - start
    in_window = [[x for x in t.token_times if start <= x < end] for t in traces]
    num_tokens = sum(len(times) for times in in_window)
    # Every request decodes through the whole window, so the pipeline's rate is the sum of
    # the requests' rates; unlike tokens / window it does not depend on where the window
    # cuts a round (with one micro-batch all N tokens of a round arrive at once).
    result.window_s = window
    result.throughput = sum((len(times) - 1) / (times[-1] - times[0])
                            for times in in_window if len(times) > 1 and times[-1] > times[0])
    result.notes.append(f"{result.system.label}: {window:.1f} s window, tokens in window / "
                        f"window = {num_tokens / window:.1f} tokens/s (vs sum of per-request "
                        f"rates {result.throughput:.1f})")
    result.num_requests = len(traces)
    result.ttft = percentiles([t.token_times[0] - t.submitted for t in traces if t.token_times])
    result.tpot = percentiles([(times[-1] - times[0]) / (len(times) - 1)
                               for times in in_window if len(times) > 1])
    result.itl = percentiles([b - a for times in in_window for a, b in itertools.pairwise(times)])
    middle = (start + end) / 2
    result.mean_context = prompt_len + sum(
        sum(x < middle for x in t.token_times) for t in traces) / len(traces)
    result.hop_bytes_per_token = bytes_per_token(samples, num_tokens)
    regime = pipe.regime
    if regime.profile is not None and result.stage_step_ms:
        batch = -(-len(traces) // max(1, pipe.head.num_microbatches))
        predicted = [regime.step_s(r, batch, result.mean_context) * 1e3 for r in pipe.ranges]
        result.notes.append(
            f"{result.system.label}: emulated step at batch {batch}: profile predicts "
            + "/".join(f"{x:.0f}" for x in predicted) + " ms, stages took (decode steps in the "
            "window) " + "/".join(f"{x:.0f}" for x in result.stage_step_ms) + " ms")


def window_done(traces: list[Trace], start: float, timing: Timing) -> bool:
    elapsed = time.perf_counter() - start
    if elapsed < timing.decode_window_s:
        return False
    if elapsed >= timing.decode_window_max_s:
        return True
    return all(len(t.token_times) - bisect.bisect_left(t.token_times, start)
               >= timing.min_window_tokens for t in traces if not t.error)


def mixed_lengths(num: int, output_cap: int, seed: int = 2) -> list[tuple[int, int]]:
    """ShareGPT-like (prompt, output) lengths: log-normal prompts (median 128, up to 1,000)
    except every tenth request (the 6th, 16th, ...), whose prompt is long (1,000-2,000);
    log-normal outputs (median 48)."""
    rng = random.Random(seed)
    lengths = []
    for i in range(num):
        if i % 10 == 5:
            prompt = rng.randint(1000, 2000)
        else:
            prompt = min(1000, max(4, round(rng.lognormvariate(math.log(128), 1.0))))
        output = min(output_cap, max(4, round(rng.lognormvariate(math.log(48), 0.8))))
        lengths.append((prompt, output))
    return lengths


def mixed_rate(regime: Regime, setting: Setting, output_cap: int, load: float) -> tuple[float, str]:
    """Arrivals/s offering ``load`` x the capacity of (b)'s scarcest resource for the tokens
    every request moves through every stage and link (prompt + output tokens)."""
    sample = mixed_lengths(5000, output_cap, seed=99)
    mean_tokens = sum(p + o for p, o in sample) / len(sample)
    token_bytes = regime.hidden_size * regime.element_bytes  # uncompressed
    link = LinkSpec.parse(setting.link).bandwidth_bps / 8 / token_bytes
    ranges = split_layers(regime.num_layers, setting.num_stages)
    if regime.profile is not None:
        compute = min(regime.prefill_tokens_per_s(r, 2048) for r in ranges)
    else:  # the stages share the machine's cores
        compute = len(os.sched_getaffinity(0)) / sum(
            1 / regime.prefill_tokens_per_s(r, 2048) for r in ranges)
    capacity = min(link, compute)
    why = (f"{load:.0%} of min(uncompressed link {link:.0f}, prefill compute {compute:.0f}) "
           f"tokens/s / {mean_tokens:.0f} prompt+output tokens per request")
    return load * capacity / mean_tokens, why


async def run_mixed(pipe: Pipeline, result: RunResult, timing: Timing, rate: float) -> None:
    """Poisson arrivals for a while, then wait for every request to finish (bounded)."""
    regime = pipe.regime
    gaps = random.Random(3)
    arrivals = list(itertools.accumulate(gaps.expovariate(rate)
                                         for _ in range(timing.mixed_requests)))
    lengths = mixed_lengths(len(arrivals), timing.mixed_output_cap)
    tokens = random.Random(4)
    traces = [Trace(p) for p, _ in lengths]
    start = time.perf_counter()
    sample0, cpu0 = pipe.link_sample(), pipe.cpu_snapshot()
    steps0 = pipe.decode_step_totals()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        prompt_len, output_len = lengths[i]
        prompt = [tokens.randrange(FIRST_TOKEN_ID, regime.prompt_vocab) for _ in range(prompt_len)]
        await consume(pipe.head, prompt, SamplingParams(temperature=0, ignore_eos=True,
                                                        max_tokens=output_len), traces[i])

    tasks = [asyncio.create_task(one(i)) for i in range(len(arrivals))]
    _, pending = await asyncio.wait(tasks, timeout=arrivals[-1] + timing.mixed_drain_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    end = max([x for t in traces for x in t.token_times[-1:]], default=time.perf_counter())
    sample1, cpu1 = pipe.link_sample(), pipe.cpu_snapshot()
    result.library_hops = pipe.describe_hops()
    result.num_microbatches = pipe.microbatches()
    result.stage_step_ms, _ = pipe.window_step_ms(steps0)
    errors = [t.error for t in traces if t.error]
    if errors:
        result.notes.append(f"{len(errors)} requests failed, e.g. {errors[0]}")
    done = [t for t in traces if t.finished]
    result.num_requests, result.num_unfinished = len(traces), len(traces) - len(done)
    result.window_s = end - start
    num_tokens = sum(len(t.token_times) for t in traces)
    result.throughput = num_tokens / result.window_s if result.window_s > 0 else 0.0
    result.ttft = percentiles([t.token_times[0] - t.submitted for t in traces if t.token_times])
    result.tpot = percentiles([(t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1)
                               for t in traces if len(t.token_times) > 1])
    result.e2e = percentiles([t.token_times[-1] - t.submitted for t in done])
    result.itl = percentiles([b - a for t in traces for a, b in itertools.pairwise(t.token_times)])
    moved = sum(t.prompt_len + len(t.token_times) for t in traces)
    result.hop_bytes_per_token = bytes_per_token([sample0, sample1], moved)
    result.cpu_percent = cpu_percent(cpu0, cpu1, result.window_s)
