"""The OpenAI-compatible API through the official ``openai`` client (sync and async), against a
real 2-stage pipeline: ``molink serve`` (layers 0:2, with ``--api-key``) + ``molink join``
(layers 2:4) as subprocesses on 127.0.0.1. Greedy answers must equal the offline ``LLM``'s.

Readiness comes from ``/health``, never from sleeping; every process started here is stopped
here, by pid.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import subprocess
import threading
import time
import types

import httpx
import openai
import pytest
import uvicorn
from transformers import AutoTokenizer

from molink import LLM, SamplingParams
from molink.entrypoints.http_server import create_app
from molink.outputs import CompletionOutput, RequestOutput
from tests.entrypoints import cli_processes
from tests.entrypoints.cli_processes import free_port, wait_for_line

CLUSTER_TOKEN = "openai-api-test-token"
API_KEY = "sk-molink-test"
MAX_MODEL_LEN = 96
DEADLINE_S = 120.0
PROMPTS = ["Hello there", "The capital of France is"]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


# ---- processes -------------------------------------------------------------------------------


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return cli_processes.spawn(*args, token=CLUSTER_TOKEN, env=env)


def drain(proc: subprocess.Popen) -> None:
    """Keep reading the output so a chatty process never blocks on a full pipe."""
    threading.Thread(target=proc.stdout.read, daemon=True).start()


def wait_healthy(url: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while httpx.get(f"{url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "pipeline never became healthy"
        time.sleep(0.2)  # polling the health check, not waiting blindly


def start_server(directory: str, procs: list[subprocess.Popen], stage_layers: list[str],
                 head_layers: str, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> str:
    """``molink serve`` (+ one ``molink join`` per stage range); -> the HTTP base URL."""
    common = ("--host", "127.0.0.1", "--dtype", "float32", "--device", "cpu",
              "--block-size", "8")
    port = free_port()
    head = spawn("serve", directory, "--layers", head_layers, "--port", str(port),
                 "--peer-port", "0", *common, *extra, env=env)
    procs.append(head)
    peer = wait_for_line(head, r"stages join 127\.0\.0\.1:(\d+)").group(1)
    drain(head)
    for layers in stage_layers:
        stage = spawn("join", directory, "--head", f"127.0.0.1:{peer}", "--layers", layers,
                      *common)
        procs.append(stage)
        drain(stage)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()  # by pid
        proc.wait()


@dataclasses.dataclass
class Server:
    url: str
    directory: str
    model: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0,
                             timeout=60)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0,
                                  timeout=60)

    def post(self, path: str, key: str | None = API_KEY, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    directory = str(tiny_model_dir("llama"))
    procs: list[subprocess.Popen] = []
    try:
        url = start_server(directory, procs, ["2:"], "0:2",
                           ("--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN)))
        yield Server(url, directory, os.path.basename(directory))
    finally:
        stop_all(procs)


@pytest.fixture(scope="module")
def llm(server):
    return LLM(model=server.directory, dtype="float32", device="cpu", block_size=8)


def greedy(max_tokens: int, **changes) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **changes)


# ---- completions --------------------------------------------------------------------------------


def test_completions_greedy_equal_offline_llm(server, llm):
    client = server.client()
    expected = [o.outputs[0] for o in llm.generate(PROMPTS, greedy(8))]
    for prompt, want in zip(PROMPTS, expected):
        answer = client.completions.create(model=server.model, prompt=prompt, max_tokens=8,
                                           user="someone", **GREEDY)
        assert answer.object == "text_completion"
        assert answer.choices[0].text == want.text
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == 8
        num_prompt = len(llm.get_tokenizer().encode(prompt))
        assert answer.usage.prompt_tokens == num_prompt
        assert answer.usage.total_tokens == num_prompt + 8
    batch = client.completions.create(model=server.model, prompt=PROMPTS, max_tokens=8, **GREEDY)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [
        w.text for w in expected]
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=8, **GREEDY)
    assert by_ids.choices[0].text == expected[0].text


def test_completions_stream_sync_and_async(server, llm):
    want = llm.generate(PROMPTS[0], greedy(8))[0].outputs[0].text
    chunks = list(server.client().completions.create(
        model=server.model, prompt=PROMPTS[0], max_tokens=8, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    async def run() -> tuple[str, str]:
        client = server.async_client()
        plain = await client.completions.create(model=server.model, prompt=PROMPTS[0],
                                                max_tokens=8, **GREEDY)
        stream = await client.completions.create(model=server.model, prompt=PROMPTS[0],
                                                 max_tokens=8, stream=True, **GREEDY)
        streamed = "".join([c.choices[0].text async for c in stream])
        return plain.choices[0].text, streamed

    assert asyncio.run(run()) == (want, want)


def test_completions_logprobs(server, llm):
    answer = server.client().completions.create(model=server.model, prompt=PROMPTS[0],
                                                max_tokens=6, logprobs=3, **GREEDY)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == 6
    assert "".join(logprobs.tokens) == choice.text
    offsets = [len("".join(logprobs.tokens[:i])) for i in range(6)]
    assert logprobs.text_offset == offsets
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
        assert value == pytest.approx(max(top.values()), abs=1e-4)  # greedy: the best token
        assert top.get(token, value) == pytest.approx(value, abs=1e-4)
    offline = llm.generate(PROMPTS[0], greedy(6, logprobs=3))[0].outputs[0]
    assert logprobs.token_logprobs == pytest.approx(
        [entry[t].logprob for entry, t in zip(offline.logprobs, offline.token_ids)], abs=1e-4)


def test_prompt_logprobs_across_stages(server, llm):
    """vLLM's prompt_logprobs, computed on the last stage and carried to the head: the
    offline LLM's values, as vLLM shapes them (None for the first token, then the top-N and
    the prompt's own token by id), on completions (whole and first chunk) and chat."""
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    offline = llm.generate(PROMPTS[1], greedy(3, prompt_logprobs=2))[0].prompt_logprobs
    client = server.client()
    whole = client.completions.create(model=server.model, prompt=PROMPTS[1], max_tokens=3,
                                      temperature=0, extra_body={"prompt_logprobs": 2})
    streamed = list(client.completions.create(model=server.model, prompt=PROMPTS[1],
                                              max_tokens=3, temperature=0, stream=True,
                                              extra_body={"prompt_logprobs": 2}))
    chat = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=2,
                                          extra_body={"prompt_logprobs": 0})
    first_chunk = streamed[0].choices[0].model_dump()
    assert all("prompt_logprobs" not in c.choices[0].model_dump() for c in streamed[1:])
    for got in (whole.choices[0].model_dump()["prompt_logprobs"], first_chunk["prompt_logprobs"]):
        assert len(got) == len(ids) and got[0] is None
        for position in range(1, len(ids)):
            want = offline[position]
            assert {int(t) for t in got[position]} == {t for t, lp in want.items() if lp.rank <= 2} | {
                ids[position]}
            for token, value in got[position].items():
                assert value["logprob"] == pytest.approx(want[int(token)].logprob, abs=1e-4)
                assert value["rank"] == want[int(token)].rank
    prompt = chat.model_dump()["prompt_logprobs"]
    assert prompt[0] is None and len(prompt) == chat.usage.prompt_tokens
    assert all(len(entry) == 1 for entry in prompt[1:])  # top 0: the prompt's own token only


def test_echo_with_logprobs_puts_the_prompt_tokens_first(server, llm):
    """Completions with echo and logprobs: the prompt's tokens first (the first with no
    logprob), then the generated ones, text offsets into the echoed text; streamed the
    same."""
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    offline = llm.generate(PROMPTS[1], greedy(4, logprobs=1, prompt_logprobs=1))[0]
    client = server.client()
    common = {"model": server.model, "prompt": PROMPTS[1], "max_tokens": 4, "echo": True,
              "logprobs": 1, **GREEDY}
    whole = client.completions.create(**common).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **common)]
    logprobs = whole.logprobs
    assert whole.text == PROMPTS[1] + offline.outputs[0].text
    assert len(logprobs.tokens) == len(ids) + 4
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(
        [offline.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))]
        + [e[t].logprob for e, t in zip(offline.outputs[0].logprobs,
                                        offline.outputs[0].token_ids)], abs=1e-4)
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    offsets = logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert offsets[len(ids)] == len(PROMPTS[1])  # the first generated token's, in the text
    assert "".join(logprobs.tokens[len(ids):]) == offline.outputs[0].text
    assert "".join(c.text for c in chunks) == whole.text
    streamed = {field: [v for c in chunks if c.logprobs for v in getattr(c.logprobs, field)]
                for field in ("tokens", "token_logprobs", "text_offset")}
    assert streamed["tokens"] == logprobs.tokens
    assert streamed["text_offset"] == logprobs.text_offset
    assert streamed["token_logprobs"][0] is None
    assert streamed["token_logprobs"][1:] == pytest.approx(logprobs.token_logprobs[1:])


def test_tokens_as_token_ids(server, llm):
    """vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:N" (completions and
    chat), N the generated ids."""
    offline = llm.generate(PROMPTS[0], greedy(4, logprobs=2))[0].outputs[0]
    answer = server.client().completions.create(
        model=server.model, prompt=PROMPTS[0], max_tokens=4, logprobs=2, temperature=0,
        extra_body={**GREEDY["extra_body"], "return_tokens_as_token_ids": True})
    logprobs = answer.choices[0].logprobs
    assert logprobs.tokens == [f"token_id:{t}" for t in offline.token_ids]
    assert all(key.startswith("token_id:") for top in logprobs.top_logprobs for key in top)
    chat = server.client().chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=1,
        temperature=0, extra_body={**GREEDY["extra_body"], "return_tokens_as_token_ids": True})
    for item in chat.choices[0].logprobs.content:
        assert item.token.startswith("token_id:") and int(item.token.removeprefix("token_id:")) >= 0
        assert item.top_logprobs[0].token.startswith("token_id:")


def test_stop_strings(server, llm):
    text = llm.generate(PROMPTS[1], greedy(16))[0].outputs[0].text
    stop = text[6:8]
    client = server.client()
    for stops in (stop, [stop, "\u0000never"]):
        answer = client.completions.create(model=server.model, prompt=PROMPTS[1], max_tokens=16,
                                           stop=stops, **GREEDY)
        assert answer.choices[0].text == text[:text.index(stop)]
        assert answer.choices[0].finish_reason == "stop"


def test_n_with_seed_is_reproducible(server):
    client = server.client()

    def draw() -> list[str]:
        answer = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=8,
                                           n=2, seed=1234, temperature=1.0,
                                           extra_body={"ignore_eos": True})
        assert sorted(c.index for c in answer.choices) == [0, 1]
        assert answer.usage.completion_tokens == 16
        return [c.text for c in sorted(answer.choices, key=lambda c: c.index)]

    first = draw()
    assert draw() == first
    assert first[0] != first[1]  # seeds 1234 and 1235
    single = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=8,
                                       seed=1235, temperature=1.0,
                                       extra_body={"ignore_eos": True})
    assert single.choices[0].text == first[1]


def test_sampling_fields_are_accepted(server):
    answer = server.client().completions.create(
        model=server.model, prompt=PROMPTS[0], max_tokens=4, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, seed=7,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
                    "stop_token_ids": [1], "ignore_eos": False, "unknown_field": [1, 2]})
    assert answer.usage.completion_tokens >= 2


# ---- chat --------------------------------------------------------------------------------


def test_chat_greedy_equal_offline_llm(server, llm):
    want = llm.chat(CHAT, greedy(8))[0].outputs[0]
    answer = server.client().chat.completions.create(model=server.model, messages=CHAT,
                                                     max_completion_tokens=8, **GREEDY)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == want.text
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 8
    assert answer.usage.prompt_tokens == len(llm.chat(CHAT, greedy(1))[0].prompt_token_ids)
    by_max_tokens = server.client().chat.completions.create(model=server.model, messages=CHAT,
                                                            max_tokens=8, **GREEDY)
    assert by_max_tokens.choices[0].message.content == want.text


def test_chat_stream_sync_and_async(server, llm):
    want = llm.chat(CHAT, greedy(8))[0].outputs[0].text
    chunks = list(server.client().chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=8, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8

    async def run() -> str:
        stream = await server.async_client().chat.completions.create(
            model=server.model, messages=CHAT, max_tokens=8, stream=True, n=2, seed=3, **GREEDY)
        texts = {0: "", 1: ""}
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
        return texts

    assert asyncio.run(run()) == {0: want, 1: want}  # greedy: the seed does not matter


def test_chat_logprobs(server):
    answer = server.client().chat.completions.create(model=server.model, messages=CHAT,
                                                     max_tokens=5, logprobs=True, top_logprobs=2,
                                                     **GREEDY)
    content = answer.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(item.token for item in content) == answer.choices[0].message.content
    for item in content:
        assert item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-4)
    plain = server.client().chat.completions.create(model=server.model, messages=CHAT,
                                                    max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


# ---- errors --------------------------------------------------------------------------------


def _assert_openai_error(response: httpx.Response, status: int, text: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text in error["message"]
    return error


def test_malformed_and_invalid_requests_are_400(server):
    for path in ("/v1/completions", "/v1/chat/completions"):
        _assert_openai_error(server.post(path, content=b"{not json"), 400, "not valid JSON")
        _assert_openai_error(server.post(path, content=b"[1, 2]"), 400, "JSON object")
    body = {"prompt": "hi", "max_tokens": 2}
    for field, value in [("temperature", "hot"), ("top_p", 7), ("max_tokens", 0),
                         ("max_tokens", 10**30), ("n", "2"), ("seed", 1.5), ("stop", 3),
                         ("logprobs", True), ("stream", "yes"), ("user", 5),
                         ("stop_token_ids", "x"), ("top_k", -5)]:
        error = _assert_openai_error(server.post("/v1/completions", json=body | {field: value}),
                                     400, field)
        assert error["param"] == field
    chat = {"messages": CHAT, "max_tokens": 2}
    for field, value in [("messages", "hi"), ("messages", [{"role": "user"}]),
                         ("messages", []), ("top_logprobs", 3), ("logprobs", 1),
                         ("max_completion_tokens", -1)]:
        _assert_openai_error(server.post("/v1/chat/completions", json=chat | {field: value}),
                             400, field)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client().completions.create(model=server.model, prompt="hi", temperature=-1)


def test_unknown_model_is_404(server):
    _assert_openai_error(server.post("/v1/completions", json={"model": "nope", "prompt": "x"}),
                         404, "nope")
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=CHAT)


def test_too_long_prompt_is_400_naming_the_limit(server):
    long_prompt = "hello " * (2 * MAX_MODEL_LEN)
    error = _assert_openai_error(server.post("/v1/completions", json={"prompt": long_prompt}),
                                 400, str(MAX_MODEL_LEN))
    assert "max_model_len" in error["message"]
    long_chat = [{"role": "user", "content": long_prompt}]
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        server.client().chat.completions.create(model=server.model, messages=long_chat,
                                                stream=True)
    _assert_openai_error(server.post("/v1/completions", json={"prompt": "hi",
                                                              "max_tokens": MAX_MODEL_LEN}),
                         400, "max_model_len")


def test_api_key_is_required(server):
    body = {"prompt": "hi", "max_tokens": 2}
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        _assert_openai_error(server.post(path, key=None, json=body), 401, "API key")
        _assert_openai_error(server.post(path, key="wrong", json=body), 401, "API key")
    models = httpx.get(f"{server.url}/v1/models", timeout=10)
    _assert_openai_error(models, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong",
                      max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    generated = server.post("/generate", json=body)
    assert generated.status_code == 200 and isinstance(generated.json()["text"], str)
    assert server.client().models.list().data[0].id == server.model


# ---- hang-ups (in-process, against a head that never finishes) --------------------------------


class EndlessHead:
    """Stands in for PipelineHead: every request generates forever until its consumer leaves."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.arch = types.SimpleNamespace(vocab_size=len(tokenizer))
        self.max_model_len = 10**6
        self.running: set[str] = set()
        self.left: list[str] = []
        self.listeners: list = []  # what HeadMetrics attaches to

    async def generate(self, prompt, params, request_id=None):
        self.running.add(request_id)
        try:
            for i in itertools.count(1):
                await asyncio.sleep(0.005)
                yield RequestOutput(request_id, None, list(prompt), [
                    CompletionOutput(0, "x" * i, [7] * i)])
        finally:  # the real head aborts the request and frees its KV blocks here
            self.running.discard(request_id)
            self.left.append(request_id)


def test_hanging_up_aborts_every_choice(tiny_model_dir):
    head = EndlessHead(AutoTokenizer.from_pretrained(str(tiny_model_dir("llama"))))
    server = uvicorn.Server(uvicorn.Config(create_app(head, "endless"), host="127.0.0.1",
                                           port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server never started"
            time.sleep(0.01)
        url = f"http://127.0.0.1:{server.config.port}"
        for path, body in [("/v1/chat/completions", {"messages": CHAT}),
                           ("/v1/completions", {"prompt": "hi"})]:
            with httpx.stream("POST", f"{url}{path}", json=body | {"stream": True, "n": 3},
                              timeout=30) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # one event, then hang up
            while head.running:  # polling the condition, not waiting blindly
                assert time.monotonic() < deadline, f"requests never aborted: {head.running}"
                time.sleep(0.01)
        for path, body in [("/v1/chat/completions", {"messages": CHAT}),
                           ("/v1/completions", {"prompt": "hi"})]:
            with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting
                httpx.post(f"{url}{path}", json=body | {"n": 2}, timeout=0.5)
            while len(head.left) < 6 + (2 if "chat" in path else 4):
                assert time.monotonic() < deadline, f"requests never aborted: {head.running}"
                time.sleep(0.01)
        assert not head.running and len(head.left) == 10
    finally:
        server.should_exit = server.force_exit = True  # do not wait for endless requests
        thread.join(timeout=10)
