"""The runs: which pipelines a command starts, and each one's workloads in turn."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.weak_links.cluster import Pipeline
from benchmarks.weak_links.measurement import RunResult
from benchmarks.weak_links.regimes import Regime, cpu_regime, emulated_regime
from benchmarks.weak_links.relay import Relays
from benchmarks.weak_links.systems import (
    ABLATIONS,
    MAIN_SYSTEMS,
    SYSTEMS,
    TARGET_LINK,
    TARGET_STAGES,
    Job,
    Setting,
    Timing,
)
from benchmarks.weak_links.workloads import mixed_rate, run_decode_heavy, run_mixed, warm_up


def plan_jobs(args) -> list[Job]:
    """Quick: the target setting only. Full: see ``--full-grid`` for what is left out."""
    regimes = ["emulated", "cpu"] if args.regime == "both" else [args.regime]
    target = (TARGET_STAGES, TARGET_LINK)
    if args.quick:
        jobs = [Job(Setting("emulated", *target), SYSTEMS["a"], ("decode",)),
                Job(Setting("emulated", *target), SYSTEMS["b"], ("mixed",)),
                Job(Setting("emulated", *target), SYSTEMS["c"], ("decode", "mixed")),
                Job(Setting("cpu", *target), SYSTEMS["c"], ("decode",))]
        return [j for j in jobs if j.setting.regime in regimes
                and (not args.systems or j.system.key in args.systems)]
    jobs = []
    for regime in regimes:
        for num_stages in args.stages:
            for link in args.links:
                jobs += setting_jobs(Setting(regime, num_stages, link), args)
    return jobs


def setting_jobs(setting: Setting, args) -> list[Job]:
    """(a), (b), (c) everywhere, ablations at the target setting. Unless --full-grid (hours):
    mixed only at 3 stages over 1gbit and 100mbit (emulated) or at the target (CPU), CPU
    ablations decode-heavy only, and CPU only at 3 stages."""
    cpu = setting.regime == "cpu"
    if not args.full_grid and cpu and setting.num_stages != TARGET_STAGES:
        return []
    mixed_here = args.full_grid or setting.is_target or (
        not cpu and setting.num_stages == TARGET_STAGES and setting.link != "20mbit:50ms")
    workloads = tuple(w for w in args.workloads if w == "decode" or mixed_here)
    keys = list(MAIN_SYSTEMS)
    if setting.is_target and not args.no_ablations:
        keys += ABLATIONS
    if args.systems:
        keys = [k for k in keys if k in args.systems]
    jobs = []
    for key in keys:
        chosen = workloads
        if key in ABLATIONS and cpu and not args.full_grid:
            chosen = tuple(w for w in workloads if w == "decode")
        if chosen:
            jobs.append(Job(setting, SYSTEMS[key], chosen))
    return jobs


async def run_job(job: Job, regime: Regime, relays: Relays, timing: Timing, args,
                  results: list[RunResult]) -> None:
    setting, system = job.setting, job.system
    pipe = Pipeline(regime, setting, system, relays, max_num_seqs=regime.concurrency)
    started = time.perf_counter()
    try:
        await pipe.start()
        await warm_up(pipe.head)
        print(f"  {system.label}: pipeline ready in {time.perf_counter() - started:.1f} s",
              flush=True)
        for workload in job.workloads:
            result = RunResult(setting, system, workload)
            results.append(result)
            try:
                if workload == "decode":
                    await run_decode_heavy(pipe, result, timing, args.prompt_len)
                else:
                    rate, why = mixed_rate(regime, setting, timing.mixed_output_cap, args.load)
                    result.notes.append(f"arrivals {rate:.2f}/s ({why})")
                    await run_mixed(pipe, result, timing, rate)
            except (TimeoutError, RuntimeError) as exc:
                result.ok, result.error = False, str(exc)
            print(f"  {system.label:<52} {workload:<6} {describe(result)}", flush=True)
    except (TimeoutError, RuntimeError, OSError) as exc:
        failed = RunResult(setting, system, ",".join(job.workloads), ok=False, error=str(exc))
        results.append(failed)
        print(f"  {system.label}: pipeline failed: {exc}", flush=True)
    finally:
        await pipe.stop()
        await relays.stop_all()
    print(f"    ({time.perf_counter() - started:.0f} s with start and stop; load average "
          f"{os.getloadavg()[0]:.1f})", flush=True)


def describe(r: RunResult) -> str:
    if not r.ok:
        return f"FAILED: {r.error}"
    text = f"{r.throughput:7.1f} tok/s"
    if r.ttft:
        text += f"  TTFT p50/p99 {r.ttft[0]:.2f}/{r.ttft[1]:.2f} s"
    if r.tpot:
        text += f"  TPOT p50/p99 {r.tpot[0] * 1e3:.0f}/{r.tpot[1] * 1e3:.0f} ms"
    if r.e2e:
        text += f"  e2e p50/p99 {r.e2e[0]:.1f}/{r.e2e[1]:.1f} s"
    if r.num_unfinished:
        text += f"  ({r.num_unfinished}/{r.num_requests} unfinished)"
    steps = "/".join(f"{x:.0f}" for x in r.stage_step_ms)
    return text + f"  micro-batches {r.num_microbatches}  steps {steps} ms"


async def run_all(args, timing: Timing) -> tuple[list[RunResult], dict[str, Regime]]:
    jobs = plan_jobs(args)
    print(f"{len(jobs)} pipelines to run", flush=True)
    results: list[RunResult] = []
    regimes: dict[str, Regime] = {}
    with tempfile.TemporaryDirectory(prefix="molink-weak-links-") as tmp:
        work = Path(tmp)
        relays = Relays(work)
        try:
            if any(j.setting.regime == "emulated" for j in jobs):
                regimes["emulated"] = emulated_regime(
                    args.model, work, args.device_profile, args.concurrency,
                    None if args.quantization == "none" else args.quantization)
            if any(j.setting.regime == "cpu" for j in jobs):
                counts = sorted({j.setting.num_stages for j in jobs if j.setting.regime == "cpu"})
                regimes["cpu"] = cpu_regime(args, counts)
            current = None
            for job in jobs:
                if job.setting != current:
                    current = job.setting
                    print(f"\n== {current.name}", flush=True)
                await run_job(job, regimes[job.setting.regime], relays, timing, args, results)
        finally:
            await relays.stop_all()
    return results, regimes
