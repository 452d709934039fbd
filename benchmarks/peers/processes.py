"""The server processes of one cluster: started with a log file each, waited for with a
bound, stopped by pid (SIGTERM, then SIGKILL after a grace period), also on failure."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from molink.entrypoints.local_pipeline import stop_processes

STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 15


class ProcessExited(RuntimeError):
    """A server ended before it was ready."""


class Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str, command: Sequence[str],
                    env: Mapping[str, str] | None = None,
                    cpus: frozenset[int] = frozenset()) -> asyncio.subprocess.Process:
        """``command`` with stdout and stderr into ``<log_dir>/<name>.log``; ``cpus``: the
        CPUs it runs on (set before it starts a thread; empty: this process's)."""
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with self.log_path(name).open("ab") as log:  # the child keeps its own copy
            proc = await asyncio.create_subprocess_exec(
                *command, env=dict(env) if env is not None else None,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=pin)
        self.procs[name] = proc
        return proc

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, num_lines: int = LOG_TAIL_LINES) -> str:
        path = self.log_path(name)
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(f"    {line}" for line in lines[-num_lines:])

    async def wait_http(self, name: str, url: str, timeout_s: float) -> None:
        """Until GET ``url`` answers 200 (e.g. /health once the model is loaded)."""
        async with httpx.AsyncClient(timeout=2.0) as client:
            async def ready() -> bool:
                try:
                    return (await client.get(url)).status_code == 200
                except httpx.HTTPError:
                    return False
            await self._wait(name, url, ready, timeout_s)

    async def wait_port(self, name: str, port: int, timeout_s: float) -> None:
        """Until 127.0.0.1:``port`` accepts a TCP connection."""
        async def ready() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0
        await self._wait(name, f"port {port}", ready, timeout_s)

    async def _wait(self, name: str, what: str, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not await ready():
            # any of the cluster's servers: a stage that rejects its options ends before the
            # head it joins is ready, and the head would wait for it until the timeout
            for other, proc in self.procs.items():
                if proc.returncode is not None:
                    raise ProcessExited(f"{other} exited with code {proc.returncode} before "
                                        f"{name}'s {what} was ready; {self.log_path(other)}:\n"
                                        f"{self.log_tail(other)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {what} not ready after {timeout_s:.0f} s; "
                                   f"{self.log_path(name)}:\n{self.log_tail(name)}")
            await asyncio.sleep(0.2)

    async def stop_all(self, first: str | None = None) -> None:
        """Process ``first`` (the one the client talks to: llama-server, a MoLink head), then
        the rest; each gets its grace period before the next is stopped."""
        ordered = sorted(self.procs.items(), key=lambda item: item[0] != first)
        try:
            for _, proc in ordered:
                await stop_processes([proc], STOP_GRACE_S)
        finally:
            await stop_processes(list(self.procs.values()), STOP_GRACE_S)  # if cancelled above
            self.procs.clear()


def own_cpus(nodes: int, threads: int) -> tuple[frozenset[int], ...]:
    """``nodes`` disjoint sets of ``threads`` + 1 CPUs each (the compute threads, and one for
    the event loop, gRPC and serializer threads that a host's other cores would run), the
    last of this process's, for servers that must not compete for cores (as on separate
    hosts); this process, and what it starts without ``cpus`` (relays, the client's work),
    keeps the rest."""
    available = sorted(os.sched_getaffinity(0))
    each = threads + 1
    need = nodes * each
    if len(available) < need + 1:
        raise SystemExit(f"{nodes} servers of {threads} thread(s) on CPUs of their own need "
                         f"{need + 1} CPUs ({each} each, one more for the client and relays); "
                         f"this process may use {len(available)}")
    os.sched_setaffinity(0, available[:-need])
    theirs = available[-need:]
    return tuple(frozenset(theirs[i * each:(i + 1) * each]) for i in range(nodes))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
