"""The benchmarks' process harness notices a server that ends while another is awaited: a
stage that rejects its options must fail the run at once, not after the head's timeout."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from benchmarks.peers.processes import Processes, ProcessExited, free_port


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
