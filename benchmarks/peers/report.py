"""The results page: setup, machine, bounds, the side-by-side table, MoLink's hop metrics."""

from __future__ import annotations

import math
import subprocess
import time

from benchmarks.peers.breakdown import hop_table, since, stage_table
from benchmarks.peers.client import Measurement
from benchmarks.peers.run import Row, Workload
from molink.transport.link_emulator import LinkSpec

TARGET_LINK = "100mbit:20ms"
TARGET_RATIO = 1.5


def lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], check=False, capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(lscpu failed: {exc})"


def write_report(command: str, setup_lines: list[str], workload: Workload, bounds: list[Row],
                 rows: list[Row], elapsed_s: float, num_missing: int = 0) -> str:
    partial = [(f"**Partial results**: {num_missing} cluster(s) of this command did not run "
                "(the run was stopped, or is still running); every row below is complete."),
               ""] if num_missing else []
    parts = [
        "# Peers: MoLink against llama.cpp RPC, side by side",
        "",
        *partial,
        (f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{elapsed_s / 60:.0f} minutes)"),
        "",
        *setup_lines,
        "",
        (f"Workload: prompts of {workload.prompt_len} random token ids, {workload.max_tokens} "
        f"output tokens (`ignore_eos`, greedy), streamed `/v1/completions`; single = "
        f"{workload.num_single} requests one after another, {workload.concurrency} at once = "
        f"one wave of {workload.concurrency} requests. tok/s: output tokens / (first "
        "submission to last token); TPOT: per request, (last token - first token) / "
        "(tokens - 1); TTFT: per request, submission to first streamed token; p50 over the "
        "requests."),
        "",
        *headline(rows),
        "## Results",
        "",
        *side_by_side(rows),
        "## Bound: each system alone, one process, one thread, no link",
        "",
        *bound_table(bounds, rows),
        *metrics_section(rows),
        *split_section(bounds + rows),
        *errors_section(bounds + rows),
        "## Machine (`lscpu`)",
        "",
        "```",
        lscpu().rstrip(),
        "```",
        "",
    ]
    return "\n".join(parts)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{1e3 * value:.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b and not math.isnan(a) and not math.isnan(b) else "-"


def _pairs(rows: list[Row]):
    """(link, precision, llama.cpp row, MoLink row) in run order."""
    seen = {}
    for row in rows:
        seen.setdefault((row.link, row.precision.name), {})[row.system] = row
    for (link, _), by_system in seen.items():
        llama, molink = by_system.get("llama.cpp"), by_system.get("MoLink")
        yield link, (llama or molink).precision, llama, molink


def _mode(row: Row | None, mode: str) -> Measurement | None:
    return None if row is None else getattr(row, mode)


def side_by_side(rows: list[Row]) -> list[str]:
    lines = [("| link | weights (llama.cpp / MoLink) | mode | llama.cpp tok/s | MoLink tok/s | "
             "MoLink / llama.cpp | llama.cpp TPOT p50 (ms) | MoLink TPOT p50 (ms) | "
             "llama.cpp TTFT p50 (ms) | MoLink TTFT p50 (ms) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for link, precision, llama, molink in _pairs(rows):
        for mode in ("single", "concurrent"):
            a, b = _mode(llama, mode), _mode(molink, mode)
            if a is None and b is None:
                continue
            label = "single" if mode == "single" else f"{(a or b).concurrency} at once"
            nan = float("nan")
            lines.append(
                f"| {link} | {precision.llama_label} / {precision.molink_label} | {label} | "
                f"{a.tokens_per_s if a else nan:.1f} | {b.tokens_per_s if b else nan:.1f} | "
                f"{_ratio(b.tokens_per_s, a.tokens_per_s) if a and b else '-'} | "
                f"{_ms(a.p50('tpot_s')) if a else '-'} | {_ms(b.p50('tpot_s')) if b else '-'} | "
                f"{_ms(a.p50('ttft_s')) if a else '-'} | {_ms(b.p50('ttft_s')) if b else '-'} |")
    return [*lines, ""]


def bound_table(bounds: list[Row], rows: list[Row]) -> list[str]:
    links = list(dict.fromkeys(r.link for r in rows))
    lines = [("The pipeline's single-stream TPOT cannot be below one process's compute time "
             "per token plus the link latency a token crosses: MoLink's token crosses 3 hops "
             "one way (head -> 2 -> 3 -> head); llama.cpp's client-driven RPC makes at least "
             "2 round trips (4 one-way latencies) per step. One thread per node on 3 nodes "
             "could at best overlap the nodes' compute, 16 at once."),
             "",
             "| system | weights | TPOT alone p50 (ms) | "
             + " | ".join(f"+ 3 x {LinkSpec.parse(link).latency_s * 1e3:g} ms ({link})"
                          for link in links) + " |",
             "|---|---|---|" + "---|" * len(links)]
    for row in bounds:
        tpot = row.single.p50("tpot_s") if row.single else float("nan")
        label = row.precision.llama_label if row.system == "llama.cpp" \
            else row.precision.molink_label
        lines.append(f"| {row.system} | {label} | {_ms(tpot)} | " + " | ".join(
            _ms(tpot + 3 * LinkSpec.parse(link).latency_s) for link in links) + " |")
    return [*lines, ""]


def headline(rows: list[Row]) -> list[str]:
    """The acceptance check of issue 18 at the target link, 16 at once, per precision."""
    lines = [f"## Headline ({TARGET_LINK})", ""]
    for link, precision, llama, molink in _pairs(rows):
        if link != TARGET_LINK or not (llama and molink and llama.single and molink.single):
            continue
        conc = [m for m in (llama.concurrent, molink.concurrent) if m]
        ratio = (molink.concurrent.tokens_per_s / llama.concurrent.tokens_per_s
                 if len(conc) == 2 and llama.concurrent.tokens_per_s else float("nan"))
        tpot_ok = molink.single.p50("tpot_s") < llama.single.p50("tpot_s")
        ttft_ok = molink.single.p50("ttft_s") < llama.single.p50("ttft_s")
        verdict = "met" if ratio >= TARGET_RATIO and tpot_ok and ttft_ok else "NOT met"
        lines.append(
            f"- {precision.llama_label} vs {precision.molink_label}: tokens/s at "
            f"{conc[0].concurrency if conc else '-'} at once MoLink / llama.cpp = {ratio:.2f}x "
            f"(target >= {TARGET_RATIO}x); single-stream TPOT {_ms(molink.single.p50('tpot_s'))}"
            f" vs {_ms(llama.single.p50('tpot_s'))} ms; TTFT "
            f"{_ms(molink.single.p50('ttft_s'))} vs {_ms(llama.single.p50('ttft_s'))} ms: "
            f"**{verdict}**")
    return [*lines, ""]


def metrics_section(rows: list[Row]) -> list[str]:
    """Per MoLink run (both modes together): the breakdown tables, then the raw lines."""
    lines = ["## Where MoLink's time goes: `/metrics` of each run", "",
             ("Scraped from the head after the single-stream requests and again after the "
              "concurrent ones (the tables of the latter are the difference). Per stage: mean "
              "compute per step, and mean wait for the step's input (the links and the stages "
              "before it); per hop: what was sent, how long a decode send waited, and what the "
              "head measured of the link."), ""]
    for row in rows:
        if row.system != "MoLink" or not row.metrics:
            continue
        concurrent = since(row.metrics, row.metrics_single)
        lines += [f"### {row.link}, {row.precision.molink_label}", "", "Single stream:", "",
                  *stage_table(row.metrics_single), *hop_table(row.metrics_single),
                  f"{row.concurrent.concurrency if row.concurrent else '-'} at once:", "",
                  *stage_table(concurrent), *hop_table(concurrent),
                  "<details><summary>raw molink_hop* and molink_stage* lines</summary>", "",
                  "```", *row.metrics, "```", "", "</details>", ""]
    return lines


def split_section(rows: list[Row]) -> list[str]:
    noted = [r for r in rows if r.notes and r.link]
    if not noted:
        return []
    row = noted[0]
    return [("## llama.cpp layer split (from llama-server's log, "
            f"{row.link}, {row.precision.llama_label})"), "", "```", *row.notes, "```", ""]


def errors_section(rows: list[Row]) -> list[str]:
    lines = []
    for row in rows:
        failed = [e for m in (row.single, row.concurrent) if m for e in m.errors]
        if row.error or failed:
            lines.append(f"- {row.system} {row.precision.name} {row.link or 'alone'}: "
                         f"{row.error or ''} {len(failed)} failed requests "
                         f"{failed[:1]}".rstrip())
    return ["## Failures", "", *lines, ""] if lines else []
