"""One run: the bounds (each system alone), then every link x precision x system, each
cluster measured one request at a time and then ``concurrency`` at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.peers.client import Measurement, make_prompts, measure, warm_up
from benchmarks.peers.clusters import MODEL_NAME, Cluster, LlamaCppRpc, MolinkPipeline, Setup
from benchmarks.peers.llama_cpp import log

CLUSTER_TIMEOUT_S = 1800.0  # start, warm-up and both modes of one cluster
METRIC_PREFIXES = ("molink_hop", "molink_stage")


@dataclass(frozen=True)
class Precision:
    """One weight precision, as each system stores it."""

    name: str
    gguf_type: str  # llama.cpp: convert_hf_to_gguf --outtype
    molink_options: tuple[str, ...]
    llama_label: str
    molink_label: str


@dataclass(frozen=True)
class Workload:
    prompt_len: int
    max_tokens: int
    num_single: int  # requests one after another
    concurrency: int  # requests at once (one wave)


@dataclass
class Row:
    link: str | None  # None: the system alone in one process (the bound)
    precision: Precision
    system: str
    single: Measurement | None = None
    concurrent: Measurement | None = None
    metrics_single: list[str] = field(default_factory=list)  # MoLink's /metrics lines ...
    metrics: list[str] = field(default_factory=list)  # ... after single, and at the end
    notes: list[str] = field(default_factory=list)  # llama-server's layer split
    error: str | None = None


def make_cluster(setup: Setup, system: str, link: str | None, precision: Precision,
                 ggufs: dict[str, Path], num_layers: int) -> Cluster:
    name = f"{system}-{precision.name}-{link or 'alone'}".replace(":", "-").replace(".", "")
    log_dir = setup.log_dir / name
    log_dir.mkdir(parents=True, exist_ok=True)
    if system == LlamaCppRpc.label:
        return LlamaCppRpc(setup, link, log_dir, ggufs[precision.gguf_type], num_layers)
    return MolinkPipeline(setup, link, log_dir, list(precision.molink_options), num_layers,
                          head_options=setup.head_options)


async def run_one(cluster: Cluster, row: Row, workload: Workload, single_only: bool) -> None:
    # different prompts per mode: a server's prompt cache must not skip a measured prefill
    single_prompts = make_prompts(workload.num_single, workload.prompt_len, seed=1)
    concurrent_prompts = make_prompts(workload.concurrency, workload.prompt_len, seed=2)
    try:
        log(f"starting {row.system} ({row.precision.name}, {row.link or 'one process'}); "
            f"logs in {cluster.procs.log_dir}")
        await cluster.start()
        await warm_up(cluster.base_url, MODEL_NAME)
        row.single = await measure(cluster.base_url, MODEL_NAME, single_prompts,
                                   workload.max_tokens, 1)
        print_mode(row, row.single)
        molink = isinstance(cluster, MolinkPipeline)
        if molink:
            row.metrics_single = await scrape_metrics(cluster.base_url)
        if not single_only:
            row.concurrent = await measure(cluster.base_url, MODEL_NAME,
                                           concurrent_prompts, workload.max_tokens,
                                           workload.concurrency)
            print_mode(row, row.concurrent)
        if molink:
            row.metrics = await scrape_metrics(cluster.base_url)
    finally:
        await cluster.stop()
        row.notes = cluster.notes


async def run_row(setup: Setup, row: Row, workload: Workload, ggufs: dict[str, Path],
                  num_layers: int, single_only: bool = False) -> Row:
    """One cluster, bounded in time; a failure is recorded in the row, and the run goes on."""
    cluster = make_cluster(setup, row.system, row.link, row.precision, ggufs, num_layers)
    try:
        await asyncio.wait_for(run_one(cluster, row, workload, single_only), CLUSTER_TIMEOUT_S)
    except (RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        log(f"FAILED {row.system} {row.precision.name} {row.link}: {row.error}")
    return row


async def run_all(setup: Setup, links: list[str], precisions: list[Precision],
                  systems: list[str], workload: Workload, ggufs: dict[str, Path],
                  num_layers: int, on_row: Callable[[list[Row], list[Row]], None]
                  ) -> tuple[list[Row], list[Row]]:
    """-> (bounds, rows): the bounds first, then link by link, llama.cpp before MoLink;
    ``on_row(bounds, rows)`` after each cluster (the page is rewritten as the run goes)."""
    bounds, rows = [], []
    for precision in precisions:
        for system in systems:
            bounds.append(await run_row(setup, Row(None, precision, system), workload, ggufs,
                                        num_layers, single_only=True))
            on_row(bounds, rows)
    for link in links:
        for precision in precisions:
            for system in systems:
                rows.append(await run_row(setup, Row(link, precision, system), workload, ggufs,
                                          num_layers))
                on_row(bounds, rows)
    return bounds, rows


def print_mode(row: Row, m: Measurement) -> None:
    mode = "single" if m.concurrency == 1 else f"{m.concurrency} at once"
    errors = f"  {len(m.errors)} FAILED: {m.errors[0]}" if m.errors else ""
    print(f"  {row.link or 'one process':<13} {row.precision.name:<7} {row.system:<10} "
          f"{mode:<11} {m.tokens_per_s:7.1f} tok/s  TPOT p50 {1e3 * m.p50('tpot_s'):7.1f} ms  "
          f"TTFT p50 {1e3 * m.p50('ttft_s'):8.1f} ms  chunks/token {m.chunks_per_token:.2f}  "
          f"({time.strftime('%H:%M:%S')}){errors}",
          flush=True)


async def scrape_metrics(base_url: str) -> list[str]:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    return [line for line in text.splitlines() if line.startswith(METRIC_PREFIXES)]
