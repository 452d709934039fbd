"""Admission control: a burst of requests cannot grow the head's waiting queue beyond
``max_waiting_requests``; the rest are answered at once with 503 + ``Retry-After``, and a
rejected request leaves nothing behind.

In-process: the app is driven through httpx's ASGI transport on this test's event loop, so
the 40 requests of a burst really arrive in the same ticks. Most tests use a stand-in head
whose requests cannot finish until the test releases them (nothing leaves the queue while a
burst is judged); one uses a real single-process PipelineHead on the tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import time
import tracemalloc
import types

import httpx
import pytest
from transformers import AutoTokenizer

from molink.coordinator.pipeline_head import PipelineNotReady
from molink.entrypoints import serve as serve_cli
from molink.entrypoints.admission import (
    DEFAULT_MAX_WAITING_REQUESTS,
    MAX_RETRY_AFTER_S,
    Admission,
)
from molink.entrypoints.answers import run_choices
from molink.entrypoints.http_server import create_app
from molink.entrypoints.job import Job
from molink.outputs import CompletionOutput, RequestOutput
from molink.sampling_params import SamplingParams
from tests.coordinator.pipeline_harness import pipeline

LIMIT = 4
CAPACITY = 2  # requests the stand-in head runs at once
BURST = 10 * LIMIT
DEADLINE_S = 20.0
CHAT = [{"role": "user", "content": "hi"}]
# One of each way in: /v1/completions (plain and streamed), /v1/chat/completions, /generate.
TARGETS = [("/v1/completions", {"prompt": "hi"}),
           ("/v1/chat/completions", {"messages": CHAT}),
           ("/generate", {"prompt": "hi"}),
           ("/v1/completions", {"prompt": "hi", "stream": True})]


class StalledHead:
    """Stands in for PipelineHead: like the real head, ``generate`` queues its request in its
    first step (no await before); CAPACITY requests run at once, FIFO; a running request
    finishes only once ``release`` is set. Leaving a generator early drops its request."""

    def __init__(self, tokenizer, capacity: int = CAPACITY) -> None:
        self.tokenizer = tokenizer
        self.arch = types.SimpleNamespace(vocab_size=len(tokenizer))
        self.max_model_len = 10**6
        self.listeners: list = []  # what HeadMetrics attaches to
        self.capacity = capacity
        self.waiting: collections.OrderedDict[str, asyncio.Future] = collections.OrderedDict()
        self.running: set[str] = set()
        self.scheduler = types.SimpleNamespace(num_waiting=0)
        self.release = asyncio.Event()
        self.num_added = 0
        self.max_waiting_seen = 0  # waiting in the head + admitted by the app, at each arrival
        self.admission: Admission | None = None  # set by the test, to check the invariant

    def _sync(self) -> None:
        while self.waiting and len(self.running) < self.capacity:
            request_id, started = self.waiting.popitem(last=False)
            self.running.add(request_id)
            started.set_result(None)
        self.scheduler.num_waiting = len(self.waiting)

    async def generate(self, prompt, params, request_id=None):
        started = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = started
        self.num_added += 1
        self.scheduler.num_waiting = len(self.waiting)
        pending = self.admission.num_pending if self.admission else 0
        self.max_waiting_seen = max(self.max_waiting_seen, len(self.waiting) + pending)
        self._sync()
        try:
            await started
            await self.release.wait()
            yield RequestOutput(request_id, None, list(prompt), [
                CompletionOutput(0, "x", [7], finish_reason="length")], finished=True)
        finally:
            if (future := self.waiting.pop(request_id, None)) is not None:
                future.cancel()
            self.running.discard(request_id)
            self._sync()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                             timeout=DEADLINE_S)


async def _until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():  # polling the condition, not waiting blindly
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


def _assert_overloaded(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "service_unavailable" and error["code"] == 503
    assert error["message"].startswith("server overloaded: ")
    assert f"requests waiting (limit {limit}); retry later" in error["message"]
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= MAX_RETRY_AFTER_S


def _statuses(responses: list[httpx.Response], limit: int) -> collections.Counter:
    """How many of each status; every answer is a 200 or a 503 "server overloaded"."""
    statuses = collections.Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            _assert_overloaded(response, limit)
    return statuses


async def _burst(client: httpx.AsyncClient, head: StalledHead) -> list[httpx.Response]:
    """BURST concurrent requests over every endpoint; the head's requests are released only
    once every request was either answered or queued in the head, so none leaves early."""
    head.release.clear()
    tasks = [asyncio.create_task(client.post(path, json=body))
             for path, body in (TARGETS[i % len(TARGETS)] for i in range(BURST))]
    num_added_before = head.num_added
    await _until(lambda: sum(t.done() for t in tasks) + head.num_added - num_added_before
                 == BURST, "the burst was never decided")
    head.release.set()
    return await asyncio.gather(*tasks)


def _check_idle(app, head: StalledHead) -> None:
    assert app.state.admission.num_pending == 0
    assert head.scheduler.num_waiting == 0 and not head.waiting and not head.running


def test_burst_is_bounded_and_rejections_are_503_with_retry_after(tokenizer):
    async def scenario():
        head = StalledHead(tokenizer)
        app = create_app(head, "stalled", max_waiting_requests=LIMIT)
        head.admission = app.state.admission
        async with _client(app) as client:
            responses = await _burst(client, head)
        return app, head, responses

    app, head, responses = asyncio.run(scenario())
    statuses = _statuses(responses, LIMIT)
    assert statuses[503] >= 1
    # Nothing finished during the burst: at most CAPACITY running + LIMIT waiting were taken.
    assert 1 <= statuses[200] <= LIMIT + CAPACITY, statuses
    assert statuses[200] == head.num_added
    assert head.max_waiting_seen <= LIMIT
    assert app.state.admission.num_rejected == statuses[503]
    _check_idle(app, head)


def test_n_beyond_the_whole_limit_is_400_naming_n(tokenizer):
    async def scenario():
        head = StalledHead(tokenizer)
        head.release.set()
        app = create_app(head, "stalled", max_waiting_requests=LIMIT)
        async with _client(app) as client:
            too_many = [await client.post(path, json=body | {"n": LIMIT + 1})
                        for path, body in TARGETS]
            two_prompts = await client.post("/v1/completions",
                                            json={"prompt": ["a", "b"], "n": 3})
            assert head.num_added == 0  # nothing of those reached the head
            exactly = await client.post("/v1/completions", json={"prompt": "hi", "n": LIMIT})
        return app, head, too_many, two_prompts, exactly

    app, head, too_many, two_prompts, exactly = asyncio.run(scenario())
    for response in [*too_many, two_prompts]:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "n" and error["type"] == "invalid_request_error"
        assert f"max_waiting_requests = {LIMIT}" in error["message"]
        assert "could never be admitted" in error["message"]
    assert "n (5) times the number of prompts (1) is 5 choices" in too_many[0].json()["error"][
        "message"]
    assert "n (3) times the number of prompts (2) is 6 choices" in two_prompts.json()["error"][
        "message"]
    assert exactly.status_code == 200 and len(exactly.json()["choices"]) == LIMIT
    assert app.state.admission.num_rejected == 0  # a 400, not an overload
    _check_idle(app, head)


def test_bursts_leave_nothing_behind_and_memory_stays_flat(tokenizer):
    async def scenario():
        head = StalledHead(tokenizer)
        app = create_app(head, "stalled", max_waiting_requests=LIMIT)
        head.admission = app.state.admission
        async with _client(app) as client:
            await _burst(client, head)  # warm-up: imports, caches, first-use allocations
            _check_idle(app, head)
            baseline_tasks = len(asyncio.all_tasks())
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                num_503 = 0
                for _ in range(5):
                    responses = await _burst(client, head)
                    num_503 += sum(r.status_code == 503 for r in responses)
                    assert {r.status_code for r in responses} <= {200, 503}
                    _check_idle(app, head)
                    assert len(asyncio.all_tasks()) == baseline_tasks
                gc.collect()
                growth = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
        return num_503, growth

    num_503, growth = asyncio.run(scenario())
    assert num_503 >= 5 * (BURST - LIMIT - CAPACITY) // 2  # most of each burst was rejected
    assert growth < 1_000_000, f"{growth} bytes kept after 5 bursts of {BURST} requests"


def test_a_real_head_keeps_its_waiting_queue_within_the_limit(tiny_model_dir):
    """A single-process PipelineHead running 2 requests at once: every request of the burst
    is a 200 or a 503, and the head's waiting queue never holds more than the limit."""

    class Watch:  # a head listener: how many wait, each time a request is queued
        max_waiting = 0

        def on_request_added(self, _request_id):
            self.max_waiting = max(self.max_waiting,
                                   head.scheduler.num_waiting + app.state.admission.num_pending)

        def on_output(self, _output):
            pass

        on_request_aborted = on_request_failed = on_request_added

    async def scenario():
        nonlocal head, app
        async with pipeline(tiny_model_dir("llama"), (0, 4), [], max_num_seqs=CAPACITY) as (
                head, _):
            app = create_app(head, "tiny", max_waiting_requests=LIMIT)
            watch = Watch()
            head.listeners.append(watch)
            body = {"max_tokens": 24, "ignore_eos": True, "temperature": 0}
            async with _client(app) as client:
                responses = await asyncio.gather(*(
                    client.post(path, json=request | body)
                    for path, request in (TARGETS[i % len(TARGETS)] for i in range(BURST))))
            scheduler = head.scheduler
            return (responses, watch.max_waiting, app.state.admission.num_pending,
                    scheduler.num_waiting, scheduler.num_unfinished)

    head = app = None
    responses, max_waiting, num_pending, num_waiting, num_unfinished = asyncio.run(scenario())
    statuses = _statuses(responses, LIMIT)
    assert statuses[503] >= 1 and statuses[200] >= 1
    assert max_waiting <= LIMIT
    assert (num_pending, num_waiting, num_unfinished) == (0, 0, 0)


def test_a_head_that_is_not_ready_still_answers_not_ready(tokenizer):
    class NotReadyHead(StalledHead):
        async def generate(self, prompt, params, request_id=None):
            raise PipelineNotReady("pipeline not ready: layers 0:4 are not served")
            yield  # an async generator, like the real one

    async def scenario():
        head = NotReadyHead(tokenizer)
        head.scheduler = None  # before the pipeline is complete
        app = create_app(head, "nothing", max_waiting_requests=1)
        async with _client(app) as client:
            responses = await asyncio.gather(*(client.post(path, json=body)
                                               for path, body in TARGETS * 3))
        return app, responses

    app, responses = asyncio.run(scenario())
    for response in responses:
        assert response.status_code == 503
        assert response.json()["error"]["message"].startswith("pipeline not ready")
        assert "retry-after" not in response.headers
    assert app.state.admission.num_pending == 0 and app.state.admission.num_rejected == 0


def test_retry_after_follows_the_rate_requests_leave():
    admission = Admission(LIMIT)
    assert admission.retry_after(5) == 1  # nothing measured yet
    now = time.monotonic()
    admission._departures.extend(now - 10 + i / 2 for i in range(20))  # 2 per second lately
    assert admission.retry_after(5) == 3  # 5 must leave: 2.5 s, rounded up
    assert admission.retry_after(10_000) == MAX_RETRY_AFTER_S
    admission._departures.clear()
    admission._departures.extend([now - 3 * Admission.WINDOW_S] * 10)  # stale: forgotten
    assert admission.retry_after(5) == 1
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_waiting_requests"):
            Admission(bad)


def test_serve_flag_defaults_to_max_num_seqs():
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    assert parser.parse_args(["model"]).max_waiting_requests is None  # -> --max-num-seqs
    assert parser.parse_args(["model", "--max-waiting-requests", "8"]).max_waiting_requests == 8
    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["model", "--max-waiting-requests", bad])
    assert DEFAULT_MAX_WAITING_REQUESTS == parser.parse_args(["model"]).max_num_seqs


def test_choices_cancelled_before_reaching_the_head_are_not_counted(tokenizer):
    """A client that leaves between admission and the pumps' first step (their tasks are
    cancelled before they run) must not leave its choices counted as pending."""
    async def scenario():
        head = StalledHead(tokenizer)
        admission = Admission(LIMIT)
        job = Job([[1, 2]], [SamplingParams(max_tokens=1)] * 3, False, False, None)
        step = run_choices(head, admission, job, "gone").__anext__()
        step.send(None)  # admits, starts the pumps' tasks, waits for the first output
        counted = admission.num_pending
        with pytest.raises(asyncio.CancelledError):
            step.throw(asyncio.CancelledError())
        await asyncio.sleep(0)  # the cancelled pumps' tasks end without running
        return counted, admission.num_pending, head.num_added

    assert asyncio.run(scenario()) == (3, 0, 0)
