"""An HTTP client for the multi-host tests, run inside a host namespace (stdlib only).

    python client.py health URL TIMEOUT_S          wait until GET URL/health is 200
    python client.py get URL                       GET URL once: prints the status and body
    python client.py complete URL BODY_JSON TIMEOUT_S

``complete`` streams ``/v1/completions`` and prints one JSON line per event as it arrives
(``{"t": seconds since start, "text": ...}``, plus ``"tokens"`` when the body asks for
logprobs), then ``{"t": ..., "done": true}`` or
``{"t": ..., "status": CODE, "error": ...}``. Every wait is bounded: a request that hangs
prints ``{"hung": true}`` at TIMEOUT_S and exits, so the test sees a hang as a hang.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.parse

START = time.monotonic()


def emit(**fields) -> None:
    print(json.dumps({"t": round(time.monotonic() - START, 3), **fields}), flush=True)


def connection(url: str, timeout_s: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)


def health(url: str, timeout_s: float) -> int:
    deadline = START + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            conn = connection(url, 5)
            conn.request("GET", "/health")
            response = conn.getresponse()
            last = response.read().decode(errors="replace")
            if response.status == 200:
                emit(ready=True)
                return 0
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    emit(ready=False, last=last)
    return 1


def get(url: str) -> int:
    parts = urllib.parse.urlsplit(url)
    try:
        conn = connection(url, 10)
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        emit(status=response.status, body=response.read().decode(errors="replace"))
    except OSError as exc:
        emit(status=0, body=f"{type(exc).__name__}: {exc}")
    return 0


def complete(url: str, body: dict, timeout_s: float) -> int:
    conn = connection(url, timeout_s)
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            emit(status=response.status, error=response.read().decode(errors="replace"))
            return 0
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                emit(done=True)
                return 0
            event = json.loads(data)
            if "error" in event:
                emit(status=event.get("status", 500), error=event["error"]["message"])
                return 0
            choice = event["choices"][0]
            tokens = (choice.get("logprobs") or {}).get("tokens")
            emit(text=choice["text"], **({"tokens": tokens} if tokens is not None else {}))
        emit(status=0, error="the stream ended without [DONE]")
    except TimeoutError:
        emit(hung=True)
    except OSError as exc:
        emit(status=0, error=f"{type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    command, url = sys.argv[1], sys.argv[2]
    if command == "health":
        sys.exit(health(url, float(sys.argv[3])))
    if command == "get":
        sys.exit(get(url))
    sys.exit(complete(url, json.loads(sys.argv[3]), float(sys.argv[4])))
