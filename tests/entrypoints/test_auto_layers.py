"""Automatic placement end to end: ``molink join`` without ``--layers`` (and ``molink serve
--layers auto``) as separate processes with different memory budgets (``--max-memory``).

The budgets are chosen so that exactly one split fits (the first node holds the embeddings
and one layer, the second three layers, the last the LM head and four), so the test checks
that the head places by memory, whatever speeds the nodes measure on a loaded machine.
Every process started here is stopped here, by pid.
"""

from __future__ import annotations

import re
import subprocess
import time

import httpx
import pytest

from molink import LLM, SamplingParams
from tests.entrypoints.cli_processes import free_port, spawn, wait_for_line
from tests.model_factory import build_model

TOKEN = "auto-layers-token"
DEADLINE_S = 120.0
COMMON = ("--dtype", "float32", "--device", "cpu", "--block-size", "8")
# Per layer of the 8-layer tiny Llama in float32: 147,968 bytes of weights + 16,384 of KV
# for 64 tokens; embeddings 131,072, LM head 131,328. Usable = 90 % of the budget.
BUDGETS = {"0.39MB": (0, 1), "0.6MB": (1, 4), "0.9MB": (4, 8)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_model("llama", tmp_path_factory.mktemp("auto8"), num_hidden_layers=8))


def _serve(model_dir: str, processes: list, *extra: str) -> tuple[str, str]:
    http_port = free_port()
    head = spawn("serve", model_dir, "--host", "127.0.0.1", "--port", str(http_port),
                 "--peer-port", "0", "--max-model-len", "64", "--placement-wait", "2",
                 *COMMON, *extra, token=TOKEN)
    processes.append(head)
    peer = wait_for_line(head, r"stages join 127\.0\.0\.1:(\d+)").group(1)
    return f"http://127.0.0.1:{http_port}", f"127.0.0.1:{peer}"


def _join(model_dir: str, head: str, memory: str, processes: list) -> subprocess.Popen:
    proc = spawn("join", model_dir, "--head", head, "--host", "127.0.0.1", "--max-memory",
                 memory, *COMMON, token=TOKEN)
    processes.append(proc)
    wait_for_line(proc, r"^offering ")  # its offer goes out before the next node starts
    return proc


def _assigned(proc: subprocess.Popen) -> tuple[int, int]:
    match = wait_for_line(proc, r"the head assigned layers (\d+):(\d+)")
    return int(match.group(1)), int(match.group(2))


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while httpx.get(f"{url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "pipeline never became healthy"
        time.sleep(0.2)  # polling the health check, not waiting blindly


def _greedy(url: str, model_dir: str) -> None:
    answer = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert answer.status_code == 200, answer.text
    llm = LLM(model=model_dir, dtype="float32", device="cpu", block_size=8)
    expected = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=8,
                                                          ignore_eos=True))[0].outputs[0]
    assert answer.json()["choices"][0]["text"] == expected.text


def test_three_stages_without_layers_are_placed_by_their_memory(model_dir, processes):
    url, head = _serve(model_dir, processes, "--layers", "none")
    stages = {}
    for memory in BUDGETS:
        stages[memory] = _join(model_dir, head, memory, processes)
        if len(stages) == 1:  # alone, the first node cannot hold the model: it is told so
            reason = wait_for_line(stages[memory], r"^head: layers 0:8 do not fit .*").group(0)
            assert "start more nodes" in reason and "short" in reason
    for memory, layers in BUDGETS.items():
        assert _assigned(stages[memory]) == layers, memory
    _wait_healthy(url)
    for memory, (start, end) in BUDGETS.items():
        blocks = int(wait_for_line(stages[memory], r"KV cache: (\d+) blocks").group(1))
        weights = 147_968 * (end - start) + 131_072 * (start == 0) + 131_328 * (end == 8)
        per_block = 8 * 256 * (end - start)  # 8 tokens x 256 bytes per token and layer
        usable = int(0.9 * float(memory.removesuffix("MB")) * 2**20)
        # The KV cache takes what the weights leave of the budget: one more block would not fit.
        assert weights + blocks * per_block <= usable < weights + (blocks + 1) * per_block
    _greedy(url, model_dir)

    # A node that comes once every layer is served waits as a spare; when a stage dies,
    # its range is placed on the spare, and the pipeline serves again.
    spare = _join(model_dir, head, "0.6MB", processes)
    assert "spare" in wait_for_line(spare, r"^head: .*").group(0)
    stages["0.6MB"].kill()  # by pid
    assert _assigned(spare) == (1, 4)
    _wait_healthy(url)
    _greedy(url, model_dir)


def test_serve_with_layers_auto_takes_the_first_range_itself(model_dir, processes):
    url, head = _serve(model_dir, processes, "--layers", "auto", "--max-memory", "0.39MB")
    stage = _join(model_dir, head, "64MB", processes)
    assert _assigned(stage) == (1, 8)
    _wait_healthy(url)
    pipeline = wait_for_line(processes[0], r"Pipeline: .*").group(0)
    assert re.search(r"head layers 0:1 -> layers 1:8", pipeline), pipeline
    _greedy(url, model_dir)
