"""Soak: a three-host pipeline under full load for 30 minutes, with faults on a schedule.

Four network namespaces on one switch, links shaped to 100 Mbit/s (``tests/multihost``'s
harness): the head (``molink serve``, layers 0:2 of the bundled model, HTTP API), two
stages (``molink join``, layers 2:4 and 4:), and a client host running
``benchmarks.soak_client``: CONCURRENCY streaming requests at all times. Every PERIOD
seconds the next fault of the cycle strikes:

- stage kill: SIGKILL stage 2, start it again 5 s later (it re-joins by itself);
- hop cut: reset every TCP connection of the hop stage 1 -> stage 2 (``ss -K``);
- head restart: SIGKILL the head and start it again at once (the stages re-join by
  themselves; the clients' open connections to the killed head are lost with it);
- hop cut: reset the hop head -> stage 1.

``--failover``: a fifth host runs a standby for stage 2's layers (``molink join --standby``),
and the faults are stage 2 going away with the standby present, in turn SIGKILL and SIGTERM
(a graceful leave) on whichever process serves layers 4: now; 5 s later the lost one is
started again as the next standby. Requests must not notice but for a pause: reported are
requests completed / replayed / failed / hung / lost, and the pause each failover put into
the streams it crossed (each stream's longest gap between two tokens).

Before the load, the ready pipeline is left idle for ``--idle-s`` seconds (200 with
``--quick``) at the real keepalive (10 s pings) and must then answer at once: the long-lived
links idle for minutes, as a pipeline waiting for its first user would.

Reported: requests completed / failed with a clear error / hung (must be 0) / lost, the
lost ones attributed to head kills when they ended within 2 s of one, and each process's
resident memory over time (it must stay flat). Stages and head run float32 (the bundled
model is float16; on CPUs without native half arithmetic, float32 is the fast choice).

    sudo python -m benchmarks.soak            # 30 minutes; writes benchmarks/results/soak.md
    sudo python -m benchmarks.soak --quick    # 3 minutes; writes benchmarks/results/soak_quick.md
    sudo python -m benchmarks.soak --failover # 30 minutes, a failover every 2 minutes;
                                              # writes benchmarks/results/soak_failover.md

Needs root (network namespaces); run from the repository root. Every process it starts
is stopped by pid, also when it fails or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from molink.entrypoints.cli import DEFAULT_MODEL_DIR
from tests.multihost.netns import Network

RESULTS = ROOT / "benchmarks" / "results"
TOKEN = "soak-benchmark-token-0123456789ab"
HTTP_PORT, HEAD_PORT, STAGE_PORT = 8000, 50051, 50052
FAULTS = ("stage kill", "hop cut 1->2", "head restart", "hop cut head->1")
FAILOVER_FAULTS = ("stage kill, standby present", "stage leave, standby present")
LEAVE_WAIT_S = 45.0  # a leaving stage exits by itself within this (else it is killed)
SAMPLE_S = 10.0
WARM_S = 30.0  # a process loads its model in this; memory growth is measured from there


class Soak:
    def __init__(self, net: Network, logs: Path, failover: bool = False) -> None:
        self.net = net
        self.head_host, self.stage1_host, self.stage2_host, *spare, self.client_host = net.hosts
        self.hosts = {"head": self.head_host, "stage1": self.stage1_host,
                      "stage2": self.stage2_host, "spare": spare[0] if spare else None}
        self.failover = failover
        self.active = "stage2"  # failover: which of stage2 / spare serves layers 4: now
        self.logs = logs
        self.env = {**os.environ, "MOLINK_CLUSTER_TOKEN": TOKEN, "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(ROOT)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.memory: list[tuple[float, str, int, float]] = []  # (t, role, pid, MiB)
        self.head_kills: list[float] = []
        self.events: list[tuple[float, str]] = []
        self._num_logs = 0

    def argv(self, role: str, standby: bool = False) -> list[str]:
        model = str(DEFAULT_MODEL_DIR)
        common = ["--dtype", "float32"]
        if role == "head":
            words = ["serve", model, "--layers", "0:2", "--port", str(HTTP_PORT),
                     "--peer-port", str(HEAD_PORT)]
        else:
            layers = "2:4" if role == "stage1" else "4:"
            words = ["join", model, "--head", f"{self.head_host.ip}:{HEAD_PORT}",
                     "--layers", layers, "--peer-port", str(STAGE_PORT)]
            words += ["--standby"] if standby else []
        return [sys.executable, "-m", "molink.entrypoints.cli", *words, *common]

    def start(self, role: str, standby: bool = False) -> None:
        host = self.hosts[role]
        self._num_logs += 1
        env = dict(self.env, MOLINK_STATE_DIR=str(self.logs / f"state-{role}"))
        log_path = self.logs / f"{self._num_logs:03d}-{role}.log"
        with log_path.open("w") as log:  # the child keeps its own copy
            self.procs[role] = host.popen(self.argv(role, standby), env=env, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=ROOT)

    def kill(self, role: str) -> None:
        proc = self.procs[role]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.client_host.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                           f"http://{self.head_host.ip}:{HTTP_PORT}/health"],
                                          timeout=10)
            if result.stdout.strip() == "200":
                return
            time.sleep(1)
        raise TimeoutError("the pipeline did not become ready")

    def idle_check(self, idle_s: float) -> dict:
        """One request, ``idle_s`` seconds of nothing, one request: both must succeed, and
        no link may have broken meanwhile."""
        results = []
        for wait in (0.0, idle_s):
            time.sleep(wait)
            started = time.monotonic()
            reply = self.client_host.run(
                ["curl", "-s", "-m", "60", "-H", "Content-Type: application/json", "-d",
                 json.dumps({"prompt": "Hello", "max_tokens": 8}),
                 f"http://{self.head_host.ip}:{HTTP_PORT}/v1/completions"], timeout=90)
            ok = '"choices"' in reply.stdout
            results.append({"ok": ok, "seconds": round(time.monotonic() - started, 2)})
        logs = "\n".join(p.read_text(errors="replace") for p in self.logs.glob("*.log"))
        return {"idle_s": idle_s, "before": results[0], "after": results[1],
                "links_broke": logs.count("broke ("), "too_many_pings": "too_many_pings" in logs}

    def fault(self, name: str) -> None:
        now = time.time()
        self.events.append((now, name))
        print(f"[{time.strftime('%H:%M:%S')}] fault: {name}", flush=True)
        if name in FAILOVER_FAULTS:
            self.lose_active(leave=name.startswith("stage leave"))
        elif name == "stage kill":
            self.kill("stage2")
            time.sleep(5)
            self.start("stage2")
        elif name == "head restart":
            self.head_kills.append(now)
            self.kill("head")
            self.start("head")
        elif name == "hop cut 1->2":
            self.stage1_host.cut_connections(port=STAGE_PORT, peer_ip=self.stage2_host.ip)
        else:
            self.head_host.cut_connections(port=STAGE_PORT, peer_ip=self.stage1_host.ip)

    def lose_active(self, leave: bool) -> None:
        """The process serving layers 4: goes (SIGTERM: it leaves; else SIGKILL); the
        standby takes over; 5 s later the lost one comes back as the next standby."""
        lost, self.active = self.active, "spare" if self.active == "stage2" else "stage2"
        proc = self.procs[lost]
        if leave:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(LEAVE_WAIT_S)
            except subprocess.TimeoutExpired:
                print(f"{lost} did not leave within {LEAVE_WAIT_S:.0f} s: killed", flush=True)
                self.kill(lost)
        else:
            self.kill(lost)
        time.sleep(5)
        self.start(lost, standby=True)

    def head_metrics(self) -> dict[str, float]:
        reply = self.client_host.run(["curl", "-s", "-m", "10",
                                      f"http://{self.head_host.ip}:{HTTP_PORT}/metrics"],
                                     timeout=30)
        values = {}
        for line in reply.stdout.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def sample_memory(self, t0: float) -> None:
        for role, proc in self.procs.items():
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            rss_kib = next(int(line.split()[1]) for line in status.splitlines()
                           if line.startswith("VmRSS:"))
            self.memory.append((time.time() - t0, role, proc.pid, rss_kib / 1024))


def run(args) -> dict:
    logs = Path(tempfile.mkdtemp(prefix="molink-soak-"))
    faults = FAILOVER_FAULTS if args.failover else FAULTS
    with Network(num_hosts=5 if args.failover else 4, bandwidth_mbit=100) as net:
        soak = Soak(net, logs, args.failover)
        for role in ("stage1", "stage2", "head"):
            soak.start(role)
        soak.wait_ready(180)
        if args.failover:
            soak.start("spare", standby=True)
        idle = soak.idle_check(args.idle_s) if args.idle_s else None
        if idle:
            print(f"idle check: {idle}", flush=True)
        print(f"ready; logs in {logs}; {args.duration_s:.0f} s of load at concurrency "
              f"{args.concurrency}, a fault every {args.period_s:.0f} s", flush=True)
        out = logs / "requests.json"
        client = soak.client_host.popen(
            [sys.executable, "-m", "benchmarks.soak_client",
             f"http://{soak.head_host.ip}:{HTTP_PORT}",
             str(args.concurrency), str(args.duration_s), str(out)], cwd=ROOT)
        t0 = time.time()
        next_fault, next_sample, index = t0 + args.period_s, t0, 0
        while client.poll() is None:
            now = time.time()
            if now >= next_sample:
                soak.sample_memory(t0)
                next_sample += SAMPLE_S
            if now >= next_fault and now - t0 < args.duration_s - 20:
                soak.fault(faults[index % len(faults)])
                index += 1
                next_fault += args.period_s
            time.sleep(0.5)
        requests = json.loads(out.read_text())
        metrics = soak.head_metrics()
        return summarize(requests, soak, t0, logs) | {"idle": idle, "metrics": {
            name: metrics.get(name, 0.0) for name in (
                "molink_failovers_total", "molink_requests_replayed_total",
                "molink_replay_pause_seconds_count", "molink_replay_pause_seconds_sum",
                "molink_replay_pause_max_seconds")}}


def summarize(requests: list[dict], soak: Soak, t0: float, logs: Path) -> dict:
    counts = {"completed": 0, "failed_clear": 0, "refused": 0, "hung": 0, "lost": 0}
    for r in requests:
        counts[r["kind"]] += 1
    lost = [r for r in requests if r["kind"] == "lost"]
    at_head_kill = [r for r in lost if any(k - 1 <= r["end"] <= k + 2 for k in soak.head_kills)]
    reasons: dict[str, int] = {}
    for r in requests:
        if r["kind"] == "failed_clear":
            key = " ".join(r["detail"].split()[:8])
            reasons[key] = reasons.get(key, 0) + 1
    return {"counts": counts, "lost_at_head_kill": len(at_head_kill), "t0": t0,
            "pauses": _pauses(requests, soak.events),
            "lost_other": [r["detail"] for r in lost if r not in at_head_kill][:20],
            "hung": [r["detail"] for r in requests if r["kind"] == "hung"][:20],
            "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:12]),
            "faults": [(round(t - t0, 1), name) for t, name in soak.events],
            "memory": soak.memory, "logs": str(logs)}


def _mean(metrics: dict[str, float], summary: str) -> float:
    count = metrics.get(f"{summary}_count", 0.0)
    return metrics.get(f"{summary}_sum", 0.0) / count if count else 0.0


def _pauses(requests: list[dict], events: list[tuple[float, str]]) -> list[dict]:
    """Per fault: the longest pause of each completed stream that was under way when it
    struck and whose longest pause ended after it (the pause it put into that stream)."""
    rows = []
    for when, name in events:
        pauses = sorted(r["longest_pause_s"] for r in requests
                        if r["kind"] == "completed" and r["start"] < when < r["end"]
                        and r.get("pause_ended_at", 0) >= when)
        if pauses:
            p99 = pauses[min(len(pauses) - 1, int(0.99 * len(pauses)))]
            rows.append({"t": when, "fault": name, "streams": len(pauses),
                         "median_s": pauses[len(pauses) // 2], "p99_s": p99,
                         "max_s": pauses[-1]})
    return rows


def write_report(result: dict, args, path: Path) -> None:
    counts = result["counts"]
    faults = FAILOVER_FAULTS if args.failover else FAULTS
    lines = [(f"# Soak{' (failover)' if args.failover else ''}: {args.duration_s / 60:.0f} "
              f"minutes under load, faults every {args.period_s:.0f} s\n"),
             (f"Command: `sudo python -m benchmarks.soak "
              f"{' '.join(shlex.quote(a) for a in sys.argv[1:])}`\n"),
             ("Five network namespaces (head, stage 1, stage 2, a standby for stage 2's "
              "layers, client)" if args.failover else
              "Four network namespaces (head, stage 1, stage 2, client)")
             + " on one switch, every link shaped to 100 Mbit/s with `tc tbf`; the bundled "
             f"model (6 layers) in float32 split 0:2 / 2:4 / 4:6; {args.concurrency} "
             "streaming clients at all times (16-64 tokens, temperature 0.8, a seed each). "
             "Faults, in a cycle: " + ", ".join(faults)
             + (" (on whichever process serves layers 4:6; 5 s later it is started again "
                "as the next standby)" if args.failover else "") + ".\n",
             ("The bound: every request must end completed or with a clear error; hung must "
             "be 0; refused (nothing listening) only while the head process is down, and "
             "lost only where it was killed (its open connections die with it).\n"),
             "| outcome | requests |", "|---|---:|"]
    for kind, n in counts.items():
        lines.append(f"| {kind} | {n} |")
    idle = result.get("idle")
    if idle:
        lines.insert(-len(counts) - 2,
                     f"Idle check (real keepalive, 10 s pings): a request before, "
                     f"{idle['idle_s']:.0f} s of nothing, a request after: before "
                     f"{'served' if idle['before']['ok'] else 'FAILED'} in "
                     f"{idle['before']['seconds']} s, after "
                     f"{'served' if idle['after']['ok'] else 'FAILED'} in "
                     f"{idle['after']['seconds']} s; links that broke while idle: "
                     f"{idle['links_broke']}; too_many_pings: {idle['too_many_pings']}.\n")
    metrics = result.get("metrics", {})
    lines += [f"| of which lost within 2 s of a head kill | {result['lost_at_head_kill']} |",
              (f"| replayed (running requests whose KV was rebuilt; the head's count) | "
               f"{metrics.get('molink_requests_replayed_total', 0):.0f} |"), "",
              (f"Failovers (the head's count): {metrics.get('molink_failovers_total', 0):.0f}; "
               f"the head's replay pause (loss detected -> the request's next token): mean "
               f"{_mean(metrics, 'molink_replay_pause_seconds'):.2f} s, max "
               f"{metrics.get('molink_replay_pause_max_seconds', 0):.2f} s.\n"),
              ("Pause per fault, seen by the streams it crossed (each stream's longest gap "
               "between two tokens):\n"),
              "| t (s) | fault | streams | median (s) | p99 (s) | max (s) |",
              "|---:|---|---:|---:|---:|---:|"]
    for row in result.get("pauses", []):
        lines.append(f"| {row['t'] - result['t0']:.0f} | {row['fault']} | {row['streams']} | "
                     f"{row['median_s']:.2f} | {row['p99_s']:.2f} | {row['max_s']:.2f} |")
    lines += ["",
              f"Faults injected: {len(result['faults'])}: "
              + ", ".join(f"{t:.0f} s {name}" for t, name in result["faults"]) + "\n",
              "Clear errors, by message (first words):\n", "| message | count |", "|---|---:|"]
    for message, n in result["failure_reasons"].items():
        lines.append(f"| {message.replace('|', '/')} | {n} |")
    lines += ["", "Unexplained losses: " + (", ".join(result["lost_other"]) or "none") + "\n",
              "Hung: " + (", ".join(result["hung"]) or "none") + "\n",
              ("Resident memory (MiB) per process: once loaded (its first sample at least "
              f"{WARM_S:.0f} s after its start) and at its last sample:\n"),
              "| role | pid | loaded (t s, MiB) | last (t s, MiB) | growth |",
              "|---|---:|---|---|---:|"]
    by_pid: dict[tuple[str, int], list] = {}
    for t, role, pid, mib in result["memory"]:
        by_pid.setdefault((role, pid), []).append((t, mib))
    for (role, pid), samples in by_pid.items():
        warm = [s for s in samples if s[0] >= samples[0][0] + WARM_S] or samples[-1:]
        (t1, m1), (t2, m2) = warm[0], samples[-1]
        lines.append(f"| {role} | {pid} | {t1:.0f}, {m1:.0f} | {t2:.0f}, {m2:.0f} | "
                     f"{m2 - m1:+.0f} |")
    lines += ["", "Machine:", "", "```", subprocess.run(["lscpu"], capture_output=True, check=False,
                                                       text=True).stdout.strip(), "```", ""]
    if plot(result, path.with_suffix(".png")):
        lines.insert(4, f"![memory over time]({path.with_suffix('.png').name})\n")
    path.write_text("\n".join(lines))


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot", flush=True)
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for role in ("head", "stage1", "stage2", "spare"):
        points = [(t, mib) for t, r, _, mib in result["memory"] if r == role]
        if points:
            ax.plot(*zip(*points), label=role)
    for t, name in result["faults"]:
        ax.axvline(t, color="grey", alpha=0.3, linewidth=0.8)
    ax.set_xlabel("seconds (grey: faults)")
    ax.set_ylabel("resident memory, MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 minutes instead of 30")
    parser.add_argument("--failover", action="store_true",
                        help="a standby for stage 2's layers; the faults take stage 2 away "
                             "(SIGKILL, SIGTERM) with the standby present")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=None,
                        help="how long the load runs (default 30; 3 with --quick)")
    parser.add_argument("--idle-s", type=float, default=None,
                        help="idle seconds before the load (default 200 with --quick, else 0)")
    parser.add_argument("--period-s", type=float, default=None,
                        help="seconds between faults (default 60; 30 with --quick)")
    args = parser.parse_args()
    args.duration_s = 60.0 * (args.minutes or (3.0 if args.quick else 30.0))
    args.period_s = args.period_s or (30.0 if args.quick else 120.0 if args.failover else 60.0)
    if args.idle_s is None:
        args.idle_s = 200.0 if args.quick else 0.0
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "memory"}, indent=1))
    name = f"soak{'_failover' * args.failover}{'_quick' * args.quick}.md"
    write_report(result, args, RESULTS / name)
    print(f"wrote {RESULTS / name}")
    idle = result["idle"]
    if result["counts"]["hung"] or result["lost_other"] or (idle and not idle["after"]["ok"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
