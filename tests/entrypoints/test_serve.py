"""``molink serve`` + ``molink join`` as separate processes, reached over HTTP.

Readiness comes from ``/health`` (503 naming the missing layers until every layer is
served), never from sleeping. Every process started here is stopped here, by pid.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from molink import LLM, SamplingParams
from tests.entrypoints.cli_processes import free_port, spawn, wait_for_line

TOKEN = "serve-test-token"
DEADLINE_S = 120.0


def _spawn(*args: str) -> subprocess.Popen:
    return spawn(*args, token=TOKEN)


def _health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=10)


def test_serve_and_join_answer_openai_requests(tiny_model_dir, processes):
    directory = str(tiny_model_dir("llama"))
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    head = _spawn("serve", directory, "--layers", "0:2", "--host", "127.0.0.1",
                  "--port", str(http_port), "--peer-port", "0", "--dtype", "float32",
                  "--device", "cpu", "--block-size", "8")
    processes.append(head)
    peer = wait_for_line(head, r"stages join 127\.0\.0\.1:(\d+)").group(1)
    response = _health(url)
    assert response.status_code == 503
    assert "layers 2:4 are not served" in response.json()["error"]["message"]
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                         timeout=10)
    assert refused.status_code == 503 and "layers 2:4" in refused.json()["error"]["message"]

    stage = _spawn("join", directory, "--head", f"127.0.0.1:{peer}", "--layers", "2:",
                   "--host", "127.0.0.1", "--dtype", "float32", "--device", "cpu",
                   "--block-size", "8")
    processes.append(stage)
    deadline = time.monotonic() + DEADLINE_S
    while _health(url).status_code != 200:
        assert time.monotonic() < deadline, "pipeline never became healthy"
        time.sleep(0.2)  # polling the health check, not waiting blindly
    wait_for_line(head, r"MoLink is ready")
    assert "Pipeline: head layers 0:2 -> layers 2:4" in wait_for_line(head, r"Pipeline: .*").group(0)
    assert wait_for_line(head, r"^curl http://127\.0\.0\.1:\d+/v1/completions")

    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt="Hello there", max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
    llm = LLM(model=directory, dtype="float32", device="cpu", block_size=8)
    expected = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=8,
                                                          ignore_eos=True))[0].outputs[0]
    assert completion.choices[0].text == expected.text
    assert completion.usage.completion_tokens == 8
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=model, prompt="Hello there", max_tokens=8, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == expected.text
    bad = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "top_p": 7}, timeout=10)
    assert bad.status_code == 400 and "top_p" in bad.json()["error"]["message"]
    unknown = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=10)
    assert unknown.status_code == 404

    from prometheus_client.parser import text_string_to_metric_families

    metrics = {s.name: s.value for f in text_string_to_metric_families(
        httpx.get(f"{url}/metrics", timeout=10).text) for s in f.samples}
    assert metrics["molink_generated_tokens_total"] >= 16
    assert metrics["molink_ready"] == 1.0
    status = subprocess.run([sys.executable, "-m", "molink.entrypoints.cli", "status", "--head",
                             f"127.0.0.1:{http_port}"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("ready: head layers 0:2 -> layers 2:4 at 127.0.0.1:")
    assert "ms/step" in status.stdout and "KV blocks free" in status.stdout
    assert re.search(r"layers 2:4 at 127\.0\.0\.1:\d+ +[\d.]+ ms/step  active", status.stdout)

    # SIGTERM on the head: it takes no new request, lets the running stream finish, then
    # tells the stage to free its requests, and exits.
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "prompt": "Hello there", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        head.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in rest
              if line.startswith("data: {")]
    assert not any("error" in event for event in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"  # all 200 tokens came
    # uvicorn ends its graceful shutdown by re-raising the signal (exit status 143, as
    # service managers expect from a process stopped by SIGTERM).
    assert head.wait(30) in (0, -signal.SIGTERM)
    wait_for_line(stage, r"the head shut down; freeing every request's state")



def test_the_http_api_serves_https_with_a_key_and_certificate(tiny_model_dir, processes,
                                                             tmp_path):
    """--ssl-keyfile/--ssl-certfile: the API answers over TLS, and not in clear."""
    from molink.transport.tls import NodeIdentity

    identity = NodeIdentity.ephemeral()
    (tmp_path / "key.pem").write_bytes(identity.key_pem)
    (tmp_path / "cert.pem").write_bytes(identity.cert_pem)
    http_port = free_port()
    head = _spawn("serve", str(tiny_model_dir("llama")), "--host", "127.0.0.1",
                  "--port", str(http_port), "--peer-port", "0", "--dtype", "float32",
                  "--device", "cpu", "--ssl-keyfile", str(tmp_path / "key.pem"),
                  "--ssl-certfile", str(tmp_path / "cert.pem"))
    processes.append(head)
    wait_for_line(head, r"HTTP API on https://127\.0\.0\.1")
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            response = httpx.get(f"https://127.0.0.1:{http_port}/health", verify=False,
                                 timeout=10)
            break
        except httpx.ConnectError:
            assert time.monotonic() < deadline, "the HTTPS API never answered"
            time.sleep(0.2)
    assert response.status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10)
