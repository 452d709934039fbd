"""Process life: signals that stop a node, and the tasks left to end before it exits."""

from __future__ import annotations

import asyncio
import signal

FINISH_TIMEOUT_S = 2.0  # at exit: how long tasks still running may take to end


async def finish_pending_tasks(timeout_s: float = FINISH_TIMEOUT_S,
                               ignore: frozenset = frozenset()) -> None:
    """Let the tasks still running end on their own before the event loop ends.

    grpc.aio's ``server.stop()`` returns before the tasks that ran the server's RPCs have
    ended: a stream still open at stop is cancelled, and its task then sends the final
    status. If the loop ended now (``asyncio.run`` returning), those tasks would be
    cancelled, and grpc logs each as "Exception not handled by _handle_exceptions in
    servicer method" followed by two ``CancelledError`` tracebacks. They end in a few loop
    iterations; whatever still runs after ``timeout_s`` is left to ``asyncio.run``.
    ``ignore``: tasks that end later on purpose (a web server's own main task)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        pending = asyncio.all_tasks() - {asyncio.current_task()} - ignore
        remaining = deadline - loop.time()
        if not pending or remaining <= 0:
            return
        await asyncio.wait(pending, timeout=remaining)


def on_signal(callback) -> None:
    """Call ``callback`` on the event loop at SIGINT / SIGTERM, on every platform.

    Where the loop cannot watch signals itself (Windows' proactor loop raises
    NotImplementedError), a ``signal.signal`` handler hands ``callback`` to the loop; once
    that loop has closed, the handler does what Python does by default (KeyboardInterrupt)
    instead of failing on the closed loop."""
    loop = asyncio.get_running_loop()

    def fallback(signum, frame) -> None:
        if loop.is_closed():
            signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt
        loop.call_soon_threadsafe(callback)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, callback)
        except (NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
            signal.signal(sig, fallback)
