"""Answers: a Job's choices run on the head, delivered whole (JSON) or as server-sent
events (``data: {...}`` lines, then ``data: [DONE]``).

Every choice runs as its own head request, concurrently. A client that disconnects aborts
every request of its answer: leaving early cancels the pumps, which leaves the head's
generators, which aborts the requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from molink.coordinator.head_loop import PipelineNotReady, StageUnavailable
from molink.entrypoints.admission import Admission
from molink.entrypoints.api_errors import SERVICE_ERRORS, error, failure
from molink.entrypoints.job import Job
from molink.entrypoints.request_log import RequestLog
from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams

_NO_LOG = RequestLog(enabled=False)


async def run_choices(head, admission: Admission, job: Job, request_id: str,
                      log: RequestLog = _NO_LOG) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Admit the request, then run every choice concurrently; yield (choice index, output) as
    they come. Admission is checked here, where every answer starts its choices, and raises
    ServerOverloaded (503) or RequestError (400) before anything starts."""
    log.received(request_id, job)
    latest: dict[int, RequestOutput] = {}
    ended: BaseException | None = None
    try:
        async with contextlib.aclosing(_run(head, admission, job, request_id)) as outputs:
            async for index, output in outputs:
                latest[index] = output
                yield index, output
    except BaseException as exc:  # GeneratorExit or CancelledError too: the client left
        ended = exc
        raise
    finally:
        log.finished(request_id, latest, ended)


async def _run(head, admission: Admission, job: Job,
               request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    choices = job.choices()
    unhanded = admission.admit(head, len(choices), len(job.choice_params))
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ids: list[int], params: SamplingParams) -> None:
        nonlocal unhanded
        handed = unhanded > 0
        if handed:  # head.generate queues the request in this same step (no await before)
            unhanded -= 1
            admission.num_pending -= 1
        try:
            async for output in head.generate(ids, params, f"{request_id}-{index}"):
                queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))
        finally:
            if handed:
                admission.departed()

    tasks = [asyncio.create_task(pump(i, ids, params)) for i, (ids, params) in enumerate(choices)]
    try:
        num_running = len(tasks)
        while num_running:
            index, item = await queue.get()
            if item is None:
                num_running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        # A pump cancelled before its first step never runs: it never reaches the head.
        admission.num_pending -= unhanded
        unhanded = 0


@dataclasses.dataclass(frozen=True)
class Runner:
    """What running an answer needs from the app."""

    head: object  # a PipelineHead (or a stand-in with its generate / scheduler)
    admission: Admission
    log: RequestLog

    def run(self, job: Job, request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
        return run_choices(self.head, self.admission, job, request_id, self.log)


async def answer(runner: Runner, job: Job, fmt, request: Request):
    """The whole answer as JSON; a client that hangs up first aborts its requests."""
    collect = asyncio.create_task(_collect(runner, job, fmt.request_id))
    hang_up = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait((collect, hang_up), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hang_up.cancel()
        if not collect.done():  # cancelling it leaves run_choices, which aborts the requests
            collect.cancel()
    if not collect.done() or collect.cancelled():
        return error(499, "client closed the request")  # nobody reads this
    try:
        finals = collect.result()
    except (*SERVICE_ERRORS, ValueError) as exc:
        return failure(exc)
    return fmt.answer(job.best([finals[i] for i in range(len(finals))]))


async def _collect(runner: Runner, job: Job, request_id: str) -> dict[int, RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    async for index, output in runner.run(job, request_id):
        finals[index] = output
    return finals


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body has been read, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def start_stream(runner: Runner, job: Job, fmt):
    """Wait for the first output before answering, so bad input (or an overloaded server) is
    an HTTP error, not an event."""
    merged = runner.run(job, fmt.request_id)
    try:
        first = await anext(merged)
    except (*SERVICE_ERRORS, ValueError) as exc:
        await merged.aclose()
        return failure(exc)
    return StreamingResponse(_events(merged, first, job, fmt), media_type="text/event-stream")


async def _events(merged, first: tuple[int, RequestOutput], job: Job, fmt) -> AsyncIterator[str]:
    finals: dict[int, RequestOutput] = {}
    try:
        for chunk in fmt.opening_chunks():
            yield _sse(chunk)
        index, output = first
        while True:
            finals[index] = output
            if (chunk := fmt.chunk(index, output)) is not None:
                yield _sse(chunk)
            try:
                index, output = await anext(merged)
            except StopAsyncIteration:
                break
        if job.include_usage:
            yield _sse(fmt.usage_chunk([finals[i] for i in sorted(finals)]))
    except (PipelineNotReady, StageUnavailable, ValueError) as exc:
        status = 503 if isinstance(exc, (PipelineNotReady, StageUnavailable)) else 400
        yield _sse(json.loads(failure(exc).body) | {"status": status})
    finally:
        await merged.aclose()
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
