"""The head's health watch outlives its checks: a check whose call is cancelled under it
(the head closing its channels as it stops) or one that fails unexpectedly neither ends
the watch nor leaves an exception nobody retrieved (asyncio logs those with a traceback,
which ``molink demo`` printed after its answer)."""

from __future__ import annotations

import asyncio
import gc
import logging
from types import SimpleNamespace

from molink.coordinator import stage_watch
from molink.coordinator.stage_watch import StageWatch


def test_cancelled_and_failing_checks_do_not_end_the_watch(monkeypatch, caplog):
    monkeypatch.setattr(stage_watch, "HEALTH_INTERVAL_S", 0.01)
    members = ["cancelled", "broken", "fine"]
    head = SimpleNamespace(membership=SimpleNamespace(all_members=lambda: members,
                                                      complete=False),
                           ready=False, configuring=False)
    watch = StageWatch(head)
    checked: list[str] = []

    async def check(member):
        checked.append(member)
        if member == "cancelled":
            raise asyncio.CancelledError  # what a gRPC call raises when its channel closes
        if member == "broken":
            raise RuntimeError("a bug in one check")

    monkeypatch.setattr(watch, "_check", check)

    async def main():
        task = asyncio.create_task(watch.run())
        while checked.count("fine") < 3:
            assert not task.done(), "the watch ended"
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
        gc.collect()
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "never retrieved" in m], messages
    failed = [m for m in messages if m.startswith("a health check failed")]
    assert len(failed) >= 3 and all("a bug in one check" in m for m in failed)
