"""MoLink across separate hosts, run as the README says: addresses, start order, restarts,
idle links, cut connections, a frozen stage, encryption.

Four network namespaces on one switch, each link shaped to 100 Mbit/s: the head, two
stages, and a client. The head and stage commands are the README's multi-machine block,
verbatim but for the model path and the head's address. The model is a tiny random Llama
with the README's 40 layers; outputs are compared with ``transformers``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from molink import SamplingParams
from tests.multihost.netns import Host, Network

README = Path(__file__).resolve().parents[2] / "README.md"
CLIENT = Path(__file__).with_name("client.py")
RELAY = Path(__file__).with_name("relay.py")
REPO = Path(__file__).resolve().parents[2]
MODEL_PLACEHOLDER = "/models/Qwen3-14B"
HTTP_PORT, HEAD_PEER_PORT, STAGE_PEER_PORT = 8000, 50051, 50052
READY_TIMEOUT_S = 120.0
PROMPT_IDS = [5, 17, 99, 23, 42, 7, 311, 64]
GREEDY = {"prompt": PROMPT_IDS, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
LONG = {"prompt": PROMPT_IDS, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
HANG_S = 60.0  # a request silent this long counts as hung (the bounds below are far less)


def readme_block() -> tuple[dict[str, str], str, list[str]]:
    """(environment, serve command, join commands) of the README's multi-machine block."""
    text = README.read_text()
    block = text[text.index("<!-- multihost:begin"):text.index("<!-- multihost:end -->")]
    env, serve, joins = {}, None, []
    for line in block.splitlines():
        line = line.strip()
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value
        elif line.startswith("molink serve "):
            serve = line
        elif line.startswith("molink join "):
            joins.append(line)
    assert serve and len(joins) == 2, "the README's multi-machine block changed shape"
    return env, serve, joins


def molink_argv(command: str, model_dir: Path, head_ip: str, *extra: str) -> list[str]:
    words = shlex.split(command.replace(MODEL_PLACEHOLDER, str(model_dir))
                        .replace("HEAD_IP", head_ip))
    assert words[0] == "molink"
    return [sys.executable, "-m", "molink.entrypoints.cli", *words[1:], *extra]


def expected_text(model, num_tokens: int) -> str:
    _, tokenizer, ids = model
    return tokenizer.decode(ids[:num_tokens], skip_special_tokens=True)


class Cluster:
    """The README's three machines plus a client machine, processes started on demand."""

    def __init__(self, net: Network, model_dir: Path, logs: Path, **env: str) -> None:
        self.net = net
        self.head_host, *self.stage_hosts, self.client_host = net.hosts
        self.model_dir = model_dir
        self.logs = logs
        readme_env, self.serve_command, self.join_commands = readme_block()
        self.token = readme_env["MOLINK_CLUSTER_TOKEN"]
        self.env = {**os.environ, **readme_env, "OMP_NUM_THREADS": "1", **env,
                    "PYTHONPATH": str(REPO)}
        self.head: subprocess.Popen | None = None
        self.stages: list[subprocess.Popen | None] = [None, None]
        self.url = f"http://{self.head_host.ip}:{HTTP_PORT}"
        self._num_logs = 0

    def _start(self, host: Host, argv: list[str], name: str) -> subprocess.Popen:
        self._num_logs += 1
        log = open(self.logs / f"{self._num_logs:02d}-{name}.log", "w")
        # Each machine keeps its own TLS identity, as separate machines would.
        env = dict(self.env, MOLINK_STATE_DIR=str(self.logs / f"state-{host.name}"))
        return host.popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def start_head(self, *extra: str) -> None:
        argv = molink_argv(self.serve_command, self.model_dir, self.head_host.ip, *extra)
        self.head = self._start(self.head_host, argv, "head")

    def start_stage(self, index: int, *extra: str) -> None:
        argv = molink_argv(self.join_commands[index], self.model_dir, self.head_host.ip, *extra)
        self.stages[index] = self._start(self.stage_hosts[index], argv, f"stage{index + 1}")

    def start_all(self) -> None:
        """Head and both stages, until the pipeline is ready."""
        self.start_head()
        self.start_stage(0)
        self.start_stage(1)
        self.wait_ready()

    def kill_head(self) -> None:
        self.head.kill()
        self.head.wait()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        result = self.client_host.run([sys.executable, str(CLIENT), "health", self.url,
                                       str(timeout_s)], timeout=timeout_s + 30)
        assert result.returncode == 0, f"not ready: {result.stdout}\n{self.log_tails()}"

    def stream(self, body: dict) -> subprocess.Popen:
        return self.client_host.popen([sys.executable, str(CLIENT), "complete", self.url,
                                       json.dumps(body), str(HANG_S)],
                                      stdout=subprocess.PIPE, text=True)

    def complete(self, body: dict) -> list[dict]:
        return finish(self.stream(body))

    def log_tails(self) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-25:]
            parts.append(f"---- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def logs_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs.glob("*.log"))


def finish(proc: subprocess.Popen) -> list[dict]:
    """The rest of a client's events. Read through ``proc.stdout`` itself: lines that
    ``first_event`` buffered there would be lost to ``communicate``, which reads the pipe
    underneath. The client always exits (every wait in it is bounded); it is killed if not."""
    timer = threading.Timer(HANG_S * 3, proc.kill)
    timer.start()
    try:
        stdout = proc.stdout.read()
    finally:
        timer.cancel()
    proc.wait()
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def first_event(proc: subprocess.Popen) -> dict:
    """Blocks until the stream's first event (a token, or an error)."""
    return json.loads(proc.stdout.readline())


def outcome(events: list[dict]) -> tuple[str, str]:
    """("done", text) | ("error", message) | ("hung", "")."""
    text = "".join(e.get("text", "") for e in events)
    last = events[-1] if events else {"hung": True}
    if last.get("done"):
        return "done", text
    if last.get("hung"):
        return "hung", text
    return "error", f"{last.get('status')}: {last.get('error')}"


@pytest.fixture
def network():
    with Network(num_hosts=4, bandwidth_mbit=100) as net:
        yield net


def test_readme_commands_any_start_order_and_a_head_restart(network, model, tmp_path):
    """Stages started 10 s before the head join it; greedy output equals transformers; a
    head killed and restarted gets the same stage processes back."""
    cluster = Cluster(network, model[0], tmp_path)
    cluster.start_stage(0)
    cluster.start_stage(1)
    time.sleep(10)  # the stages are up, retrying, before the head exists
    assert all(p.poll() is None for p in cluster.stages), cluster.log_tails()
    cluster.start_head()
    cluster.wait_ready()
    assert outcome(cluster.complete(GREEDY)) == ("done", expected_text(model, 24))
    logs = cluster.logs_text()
    assert "waiting for the head at" in logs
    # Each stage is reached at the address its join came from, not 127.0.0.1.
    for host in cluster.stage_hosts:
        assert f"reached at {host.ip}:{STAGE_PEER_PORT}" in logs, cluster.log_tails()

    cluster.kill_head()
    cluster.start_head()
    cluster.wait_ready()
    assert outcome(cluster.complete(GREEDY)) == ("done", expected_text(model, 24))
    assert all(p.poll() is None for p in cluster.stages), "a stage process exited"
    assert "restarted; joining it again" in cluster.logs_text()


def test_idle_links_stay_up(network, model, tmp_path):
    """Keepalive shortened 20x (0.5 s pings; the server policy scales with it): 30 s idle is
    60 pings per connection, where gRPC's default server policy closes a connection after
    its third ping without data (GOAWAY too_many_pings)."""
    cluster = Cluster(network, model[0], tmp_path, MOLINK_KEEPALIVE_S="0.5")
    cluster.start_all()
    assert outcome(cluster.complete(GREEDY)) == ("done", expected_text(model, 24))
    time.sleep(30)
    assert outcome(cluster.complete(GREEDY)) == ("done", expected_text(model, 24))
    logs = cluster.logs_text()
    assert "too_many_pings" not in logs.lower() and "broke" not in logs, cluster.log_tails()


HOPS = ("head -> stage 1", "stage 1 -> stage 2", "stage 2 -> head")
CUT = {**LONG, "max_tokens": 150}  # ~10 s of stream: the cut and its recovery fall inside


def test_a_hop_cut_mid_stream_recovers(network, model, tmp_path):
    """Each hop in turn: its TCP connections are reset mid-generation; the stream is
    re-opened, what it had not delivered is sent again, and the request finishes with exactly
    the tokens of an uninterrupted run. (One cluster for the three hops: starting one is most
    of the cost.)"""
    cluster = Cluster(network, model[0], tmp_path)
    cluster.start_all()
    head, stage1, stage2 = cluster.head_host, *cluster.stage_hosts
    for hop in HOPS:
        reopened = cluster.logs_text().count("re-opening it")
        proc = cluster.stream(CUT)
        first = first_event(proc)
        assert "text" in first
        time.sleep(0.5)
        if hop == "head -> stage 1":
            cut = head.cut_connections(port=STAGE_PEER_PORT, peer_ip=stage1.ip)
        elif hop == "stage 1 -> stage 2":
            cut = stage1.cut_connections(port=STAGE_PEER_PORT, peer_ip=stage2.ip)
        else:
            cut = stage2.cut_connections(port=HEAD_PEER_PORT, peer_ip=head.ip)
        assert cut >= 1, hop
        started = time.monotonic()
        events = [first, *finish(proc)]
        kind, text = outcome(events)
        assert kind == "done", f"{hop}: {kind}: {text}\n{cluster.log_tails()}"
        assert events[-1]["t"] - first["t"] > 1.5, f"{hop}: the stream ended before the cut"
        assert text == expected_text(model, CUT["max_tokens"]), hop
        assert time.monotonic() - started < HANG_S, hop
        assert cluster.logs_text().count("re-opening it") > reopened, hop
    assert outcome(cluster.complete(GREEDY)) == ("done", expected_text(model, 24))


def test_a_frozen_stage_fails_its_requests_clearly_then_rejoins(network, model, tmp_path):
    """With failover off: SIGSTOP on a stage mid-stream: the request ends within seconds with
    a 503 naming the stage (never a hang); after SIGCONT the stage joins again and serves.
    (With failover on, the request would wait for it: tests/multihost/test_failover.py.)"""
    cluster = Cluster(network, model[0], tmp_path)
    cluster.start_head("--failover-timeout", "0")
    cluster.start_stage(0)
    cluster.start_stage(1)
    cluster.wait_ready()
    proc = cluster.stream(LONG)
    assert "text" in first_event(proc)
    frozen = cluster.stages[1]
    os.killpg(frozen.pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        kind, message = outcome(finish(proc))
        assert kind == "error" and message.startswith("503"), f"{kind}: {message}"
        assert "layers 28:40" in message
        assert time.monotonic() - stopped_at < 15
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    cluster.wait_ready(60)
    assert outcome(cluster.complete(GREEDY)) == ("done", expected_text(model, 24))
    assert frozen.poll() is None


def stage_one_activation(model_dir: Path) -> bytes:
    """A row of what stage 1 (layers 14:28) sends stage 2 for the prompt's prefill: the same
    code on the same CPU computes the same float32 bytes."""
    from molink.config import CacheConfig, ModelConfig
    from molink.messages import BatchEntry, NewRequest, StepPlan
    from molink.runtime.stage_executor import StageExecutor

    executor = StageExecutor(ModelConfig(model=str(model_dir), dtype="float32", device="cpu",
                                         end_layer=28), CacheConfig(num_blocks=4))
    plan = StepPlan(0, [BatchEntry("r", 0, len(PROMPT_IDS), False)],
                    new_requests=[NewRequest("r", PROMPT_IDS, len(PROMPT_IDS),
                                             SamplingParams(), [0])])
    return executor.execute(plan)[3].numpy().tobytes()  # [hidden] of the 4th token


def test_links_are_encrypted_and_an_impostor_is_refused(network, model, tmp_path):
    """Stage 2 advertises a relay's address (as behind a port forward). Through a relay
    that only forwards bytes the pipeline works, and neither the token nor an activation's
    bytes cross it in clear; with --insecure-peers the same check finds them (so it can
    fail). A relay that presents its own certificate is refused before anything but the TLS
    handshake reaches it, and /health names both ends and the address tried."""
    activation = stage_one_activation(model[0])
    prompt_ids = bytes([5, 17, 99, 23, 42, 7, 0xB7, 0x02, 64])  # PROMPT_IDS as varints

    relay_host = None
    for insecure in (False, True):
        extra = ("--insecure-peers",) if insecure else ()
        logs = tmp_path / ("insecure" if insecure else "tls")
        logs.mkdir()
        cluster = Cluster(network, model[0], logs)
        relay_host = cluster.client_host
        record = logs / "relay.bin"
        relay = relay_host.popen([sys.executable, str(RELAY), "plain", "6000",
                                          f"{cluster.stage_hosts[1].ip}:{STAGE_PEER_PORT}",
                                          str(record)], stdout=subprocess.PIPE, text=True,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})
        assert relay.stdout.readline().strip() == "listening"
        cluster.start_head(*extra)  # default compression: lossless, exact text
        cluster.start_stage(0, *extra)
        cluster.start_stage(1, "--advertise", f"{relay_host.ip}:6000", *extra)
        cluster.wait_ready()
        assert outcome(cluster.complete(GREEDY)) == ("done", expected_text(model, 24))
        seen = record.read_bytes()
        assert len(seen) > 10_000  # the hop's traffic did cross the relay
        if insecure:  # the check can fail: in clear, the bytes are there
            assert activation in seen and prompt_ids in seen
        else:
            assert cluster.token.encode() not in seen
            assert activation not in seen and prompt_ids not in seen
        for host in network.hosts:
            host.kill_all()

    # A man-in-the-middle with its own certificate, where stage 2 says it is.
    logs = tmp_path / "impostor"
    logs.mkdir()
    cluster = Cluster(network, model[0], logs)
    record = logs / "impostor.bin"
    impostor = relay_host.popen([sys.executable, str(RELAY), "impostor", "6001", str(record)],
                                stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    assert impostor.stdout.readline().strip() == "listening"
    cluster.start_head()
    cluster.start_stage(0)
    cluster.start_stage(1, "--advertise", f"{relay_host.ip}:6001")
    deadline = time.monotonic() + READY_TIMEOUT_S
    health = ""
    while time.monotonic() < deadline and "presents certificate" not in health:
        result = cluster.client_host.run([sys.executable, str(CLIENT), "get",
                                          f"{cluster.url}/health"], timeout=30)
        health = json.loads(result.stdout)["body"]
        time.sleep(1)
    # The head, configuring stage 2 where it says it is, meets the impostor first.
    assert "the head cannot reach layers 28:40" in health, health
    assert f"{relay_host.ip}:6001 presents certificate" in health, health
    assert record.read_bytes() == b""  # not a byte past the TLS handshake
