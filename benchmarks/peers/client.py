"""The one streaming client both systems are measured with: OpenAI ``/v1/completions``.

Every request is the same JSON body for both servers: a prompt of random token ids,
``max_tokens``, ``temperature`` 0, ``ignore_eos``, ``stream`` with usage in the last chunk.
A server may send several tokens in one chunk (a byte-level token that ends inside a UTF-8
character is held back until the character is whole), so a request's token count is the
usage the server reports, and TPOT is the time from its first chunk to its last divided by
the tokens after the first: the mean inter-token time, whatever the chunking.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

FIRST_PROMPT_ID = 6  # ids 0..5 are special tokens in the benchmark tokenizer
PROMPT_VOCAB = 2048  # ids the tokenizer defines (the model's vocab of 8,000 is padded)
REQUEST_TIMEOUT_S = 600.0


@dataclass
class Trace:
    submitted: float = 0.0
    first: float | None = None  # the first chunk carrying a choice
    last: float | None = None
    num_tokens: int = 0
    num_chunks: int = 0  # events carrying a choice: fewer than tokens when text is held back
    error: str | None = None
    chunk_times: list[float] = field(default_factory=list)  # when each such event arrived

    @property
    def ttft_s(self) -> float:
        return self.first - self.submitted

    @property
    def tpot_s(self) -> float | None:
        if self.num_tokens < 2:
            return None
        return (self.last - self.first) / (self.num_tokens - 1)


@dataclass
class Measurement:
    """One mode (single stream or N at once) of one system: its traces and the window."""

    concurrency: int
    traces: list[Trace] = field(default_factory=list)
    window_s: float = 0.0  # first submission to last token

    @property
    def errors(self) -> list[str]:
        return [t.error for t in self.traces if t.error]

    @property
    def tokens_per_s(self) -> float:
        tokens = sum(t.num_tokens for t in self.traces if not t.error)
        return tokens / self.window_s if self.window_s else 0.0

    @property
    def chunks_per_token(self) -> float:
        ok = [t for t in self.traces if not t.error]
        tokens = sum(t.num_tokens for t in ok)
        return sum(t.num_chunks for t in ok) / tokens if tokens else float("nan")

    def p50(self, what: str) -> float:
        values = [getattr(t, what) for t in self.traces if not t.error]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else float("nan")


def make_prompts(num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_PROMPT_ID, PROMPT_VOCAB) for _ in range(length)]
            for _ in range(num)]


def request_body(model: str, prompt: list[int], max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, trace: Trace) -> None:
    """One streamed request into ``trace``; a failure is recorded there, not raised."""
    trace.submitted = time.perf_counter()
    usage = 0
    try:
        async with client.stream("POST", url, json=body, timeout=REQUEST_TIMEOUT_S) as reply:
            if reply.status_code != 200:
                trace.error = f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}"
                return
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("choices"):
                    trace.last = time.perf_counter()
                    trace.first = trace.first or trace.last
                    trace.num_chunks += 1
                    trace.chunk_times.append(trace.last)
                usage = (event.get("usage") or {}).get("completion_tokens") or usage
    except (httpx.HTTPError, ValueError) as exc:
        trace.error = f"{type(exc).__name__}: {exc}"
        return
    trace.num_tokens = usage or trace.num_chunks
    if trace.first is None:
        trace.error = "no token streamed"


async def measure(base_url: str, model: str, prompts: list[list[int]], max_tokens: int,
                  concurrency: int) -> Measurement:
    """``prompts`` with at most ``concurrency`` in flight at a time."""
    result = Measurement(concurrency, [Trace() for _ in prompts])
    gate = asyncio.Semaphore(concurrency)
    url = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:

        async def one(prompt: list[int], trace: Trace) -> None:
            async with gate:
                await stream_one(client, url, request_body(model, prompt, max_tokens), trace)

        start = time.perf_counter()
        await asyncio.gather(*(one(p, t) for p, t in zip(prompts, result.traces, strict=True)))
    ends = [t.last for t in result.traces if t.last is not None]
    result.window_s = (max(ends) - start) if ends else 0.0
    return result


async def warm_up(base_url: str, model: str) -> None:
    """One short request, so that no measured one pays for first-use costs."""
    result = await measure(base_url, model, make_prompts(1, 16, seed=99), 4, 1)
    if result.errors:
        raise RuntimeError(f"warm-up request to {base_url} failed: {result.errors[0]}")
