"""The benchmarks' process harness notices a server that ends while another is awaited: a
stage that rejects its options must fail the run at once, not after the head's timeout; and it
gives servers CPUs of their own where asked."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from benchmarks.peers import processes
from benchmarks.peers.processes import Processes, ProcessExited, free_port, own_cpus


def test_waiting_for_one_server_notices_another_exit(tmp_path):
    async def scenario() -> float:
        procs = Processes(tmp_path)
        try:
            await procs.start("head", [sys.executable, "-c", "import time; time.sleep(60)"])
            await procs.start("stage2", [sys.executable, "-c",
                                         "import sys; print('bad option'); sys.exit(2)"])
            started = time.monotonic()
            with pytest.raises(ProcessExited, match="stage2 exited with code 2") as raised:
                await procs.wait_port("head", free_port(), timeout_s=30)
            assert "bad option" in str(raised.value)  # the log's tail says why
            return time.monotonic() - started
        finally:
            await procs.stop_all()

    assert asyncio.run(scenario()) < 10


def test_own_cpus_splits_the_last_cpus_and_keeps_the_rest(monkeypatch):
    kept = []
    monkeypatch.setattr(processes.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(processes.os, "sched_setaffinity", lambda pid, cpus: kept.append(cpus))
    # each: 3 compute threads + 1 for its event loop, gRPC and serializers
    assert own_cpus(3, 3) == (frozenset({4, 5, 6, 7}), frozenset({8, 9, 10, 11}),
                              frozenset({12, 13, 14, 15}))
    assert kept == [[0, 1, 2, 3]]  # this process: the client and the relays it starts
    with pytest.raises(SystemExit, match="need 17 CPUs"):
        own_cpus(4, 3)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_a_server_started_on_given_cpus_runs_on_them(tmp_path):
    cpu = min(os.sched_getaffinity(0))
    code = "import os; print(sorted(os.sched_getaffinity(0)))"

    async def scenario() -> None:
        procs = Processes(tmp_path)
        try:
            proc = await procs.start("stage2", [sys.executable, "-c", code],
                                     cpus=frozenset({cpu}))
            assert await proc.wait() == 0
        finally:
            await procs.stop_all()

    asyncio.run(scenario())
    assert (tmp_path / "stage2.log").read_text().strip() == f"[{cpu}]"
