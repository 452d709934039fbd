"""The soak benchmark's load: N streaming clients in a loop, each request classified.

Runs inside the client's network namespace (stdlib only)::

    python -m benchmarks.soak_client URL CONCURRENCY DURATION_S OUT_JSON

Every request is a streamed ``/v1/completions``; its outcome is one of
- ``completed``: the stream ended with ``[DONE]`` after its tokens;
- ``failed_clear``: an HTTP error or an error event with a message (a 503 naming the stage
  or hop, "pipeline not ready", "server overloaded" with Retry-After);
- ``hung``: nothing arrived for ``HANG_S`` (the server must never let that happen);
- ``refused``: nothing listens at the head's address (its process is down: nothing was
  accepted, so nothing is lost);
- ``lost``: the connection closed without an error message (what a client sees when the
  head process it talks to is killed).
Each outcome is logged with its time, so the benchmark can attribute losses to the moments
it killed the head, and with the longest pause between two events of its stream (and when
that pause ended), so it can measure what a failover costs a stream.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import urllib.parse
from pathlib import Path

HANG_S = 60.0
PROMPTS = ["In Python, a list is", "The json module", "A generator function", "To open a file",
           "Exceptions in Python", "The asyncio event loop", "A dictionary maps", "Unicode"]


class Pauses:
    """The longest gap between two events of one stream, and when it ended."""

    def __init__(self) -> None:
        self.last = time.time()
        self.longest = 0.0
        self.ended_at = 0.0

    def event(self) -> None:
        now = time.time()
        if now - self.last > self.longest:
            self.longest, self.ended_at = now - self.last, now
        self.last = now


async def one_request(host: str, port: int, body: dict,
                      pauses: Pauses | None = None) -> tuple[str, str]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except ConnectionRefusedError:
        return "refused", "connection refused"
    except (OSError, TimeoutError) as exc:
        return "lost", f"connect: {type(exc).__name__}"
    try:
        payload = json.dumps(body).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                     + payload)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), HANG_S)
        if not status_line:
            return "lost", "closed before a status line"
        status = int(status_line.split()[1])
        headers = {}
        while (line := await asyncio.wait_for(reader.readline(), HANG_S)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            text = (await asyncio.wait_for(reader.read(), HANG_S)).decode(errors="replace")
            kind = "failed_clear" if '"message"' in text else "lost"
            return kind, f"{status} {headers.get('retry-after', '')} {text[:200]}"
        tokens = 0
        while True:
            line = await asyncio.wait_for(reader.readline(), HANG_S)
            if not line:
                return "lost", f"stream closed after {tokens} events without [DONE]"
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return "completed", f"{tokens} events"
            event = json.loads(data)
            if "error" in event:
                return "failed_clear", f"{event.get('status')} {event['error']['message'][:200]}"
            tokens += 1
            if pauses is not None and tokens > 1:  # between tokens, not before the first
                pauses.event()
            elif pauses is not None:
                pauses.last = time.time()
    except TimeoutError:
        return "hung", f"nothing for {HANG_S:.0f} s"
    except (OSError, ValueError, IndexError) as exc:
        return "lost", f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()


async def worker(index: int, host: str, port: int, stop_at: float, log: list) -> None:
    rng = random.Random(index)
    while time.monotonic() < stop_at:
        body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(16, 64),
                "temperature": 0.8, "seed": rng.randint(0, 1 << 30), "stream": True}
        started = time.time()
        pauses = Pauses()
        kind, detail = await one_request(host, port, body, pauses)
        log.append({"start": started, "end": time.time(), "kind": kind, "detail": detail,
                    "longest_pause_s": round(pauses.longest, 3),
                    "pause_ended_at": pauses.ended_at})
        if kind != "completed":
            await asyncio.sleep(0.5)  # a client backs off after an error


async def run(url: str, concurrency: int, duration_s: float) -> list[dict]:
    parts = urllib.parse.urlsplit(url)
    log: list = []
    stop_at = time.monotonic() + duration_s
    await asyncio.gather(*(worker(i, parts.hostname, parts.port, stop_at, log)
                           for i in range(concurrency)))
    return log


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m benchmarks.soak_client URL CONCURRENCY DURATION_S OUT_JSON",
              file=sys.stderr)
        return 2
    log = asyncio.run(run(argv[0], int(argv[1]), float(argv[2])))
    Path(argv[3]).write_text(json.dumps(log))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
