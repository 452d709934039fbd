"""``molink`` CLI processes for the HTTP tests: started here with piped output, read line by
line until a pattern shows (never sleeping); the caller stops each one by pid."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

DEADLINE_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(*args: str, token: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``molink <args>`` with ``token`` as its cluster token; stdout and stderr in one pipe."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", MOLINK_CLUSTER_TOKEN=token, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "molink.entrypoints.cli", *args],
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_line(proc: subprocess.Popen, pattern: str) -> re.Match:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"process never printed {pattern!r}")
