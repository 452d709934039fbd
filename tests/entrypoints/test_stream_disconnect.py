"""A streaming client that hangs up mid-generation frees its KV blocks, end to end over HTTP.

``molink serve`` (layers 0:2) + ``molink join`` (layers 2:4, emulated) as subprocesses on
127.0.0.1. The joined stage emulates a device that takes DECODE_S per token, so the
request's MAX_TOKENS tokens need at least MAX_TOKENS * DECODE_S seconds (80 s): far longer
than this test's whole timeline, so the generation cannot finish before the client leaves
and the blocks can only come back through the abort. The same live pipeline then shows its
per-hop figures in ``/metrics`` and ``molink status``. Readiness comes from ``/health``,
never from sleeping; every process started here is stopped here, by pid.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from molink.entrypoints import status

TOKEN = "stream-disconnect-test-token"
DECODE_S = 0.2  # per token, on the emulated stage (2 layers x 100 ms)
MAX_TOKENS = 400  # => at least 80 s of generation
NUM_CHUNKS_READ = 3
START_DEADLINE_S = 60.0
RELEASE_DEADLINE_S = 10.0  # the abort needs one in-flight step (DECODE_S) to come back


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def spawn(tmp_path):
    """``spawn(name, *args)`` starts ``molink <args>`` logging to a file; returns the log path."""
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> Path:
        log = tmp_path / f"{name}.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", MOLINK_CLUSTER_TOKEN=TOKEN)
        with log.open("w") as out:  # a file, not a pipe nobody drains
            procs.append(subprocess.Popen([sys.executable, "-m", "molink.entrypoints.cli", *args],
                                          env=env, stdout=out, stderr=subprocess.STDOUT))
        return log

    yield start
    for proc in procs:
        proc.kill()  # by pid
        proc.wait()


def _wait_for_line(log: Path, pattern: str) -> re.Match:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if match := re.search(pattern, log.read_text(), re.MULTILINE):
            return match
        time.sleep(0.1)  # polling the log for the line, not waiting blindly
    raise AssertionError(f"{log.name} never printed {pattern!r}:\n{log.read_text()[-2000:]}")


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def _start_pipeline(tmp_path: Path, model: str, spawn) -> str:
    http_port = _free_port()
    url = f"http://127.0.0.1:{http_port}"
    common = ("--dtype", "float32", "--block-size", "8", "--num-kv-blocks", "128")
    head_log = spawn("head", "serve", model, "--layers", "0:2", "--host", "127.0.0.1",
                     "--port", str(http_port), "--peer-port", "0", "--device", "cpu", *common)
    peer = _wait_for_line(head_log, r"stages join 127\.0\.0\.1:(\d+)").group(1)
    profile = tmp_path / "slow-device.json"
    per_layer_ms = DECODE_S * 1e3 / 2
    profile.write_text(json.dumps({"name": "slow", "decode_ms_per_layer": [[1, per_layer_ms]],
                                   "prefill_ms_per_layer": [[1, 20.0], [1024, 20.0]]}))
    spawn("stage", "join", model, "--head", f"127.0.0.1:{peer}", "--layers", "2:",
          "--host", "127.0.0.1", "--emulate-device", str(profile), *common)
    deadline = time.monotonic() + START_DEADLINE_S
    while httpx.get(f"{url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "pipeline never became healthy"
        time.sleep(0.1)  # polling the health check
    return url


def test_disconnecting_stream_frees_its_kv_blocks(tiny_model_dir, tmp_path, spawn):
    url = _start_pipeline(tmp_path, str(tiny_model_dir("llama")), spawn)
    idle = _metrics(url)
    assert idle["molink_kv_blocks_used"] == 0.0

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    started = time.monotonic()
    stream = client.completions.create(model=client.models.list().data[0].id, prompt="Hello",
                                       max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = [chunk for _, chunk in zip(range(NUM_CHUNKS_READ), stream)]  # pulls exactly 3
    assert [c.choices[0].finish_reason for c in chunks] == [None] * NUM_CHUNKS_READ
    holding = _metrics(url)
    stream.close()  # the client hangs up mid-generation
    client.close()
    hung_up = time.monotonic()

    deadline = hung_up + RELEASE_DEADLINE_S
    released = _metrics(url)
    while released["molink_kv_blocks_used"] != 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)  # polling /metrics
        released = _metrics(url)

    # The timeline is provably shorter than the generation: it could not have finished.
    assert time.monotonic() - started < MAX_TOKENS * DECODE_S / 2
    assert holding["molink_kv_blocks_used"] > 0
    assert holding["molink_running_requests"] == 1.0
    assert released["molink_kv_blocks_used"] == 0.0, "the abandoned request kept its KV blocks"
    assert released["molink_kv_blocks_free"] == idle["molink_kv_blocks_free"]
    assert released["molink_running_requests"] == 0.0
    assert released["molink_queue_length"] == 0.0
    # Ended by the hang-up, not by running out of tokens or by a failure, after far fewer
    # tokens than asked for.
    outcomes = {k for k in released if k.startswith("molink_requests_total")}
    assert outcomes <= {"molink_requests_total{outcome=abort}"}, outcomes
    assert NUM_CHUNKS_READ <= released["molink_generated_tokens_total"] < MAX_TOKENS / 4

    # The live pipeline's per-hop figures reach /metrics and `molink status`, in order: the
    # head's hop to the stage, then the stage's results link back to the head.
    prefix = "molink_hop_bytes_sent_total{hop="
    hops = [key[len(prefix):-1] for key in released if key.startswith(prefix)]
    assert len(hops) == 2 and hops[0].startswith("head") and hops[1].endswith("-> head"), hops
    assert "layers 2:4" in hops[0].split("->")[1] and "layers 2:4" in hops[1].split("->")[0]
    for hop in hops:
        assert released[f"{prefix}{hop}}}"] > 0
        assert released[f"molink_hop_messages_sent_total{{hop={hop}}}"] > 0
    lines = [line.strip() for line in status.render(url.removeprefix("http://")).splitlines()]
    assert [hop for line in lines for hop in hops if line.startswith(hop + " ")] == hops
