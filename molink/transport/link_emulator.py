"""LinkEmulator: a TCP relay that behaves like a slow link (bandwidth, latency, jitter).

Put it between two stages (the previous hop connects to the relay, the relay connects to
the real stage) to reproduce a home uplink or the public internet on one machine::

    sender --TCP--> [ relay: serialise at `bandwidth`, then delay by `latency` ] --TCP--> receiver

Every connection through one relay shares its capacity, per direction, like one physical
link. Bytes are read only as fast as the link serialises them, so a fast sender is
back-pressured as TCP would be by a real link.

The relay is an asyncio task: on a loaded machine it can wake up late, and then its wire
stands idle while bytes wait, so it carries them slower than ``bandwidth``. It counts that
time; ``achieved_bps`` is the rate it really delivered at while it had bytes to carry.
Bytes are delivered when their latency is up to within ~0.1 ms (an idle machine): asyncio's
own timers wake up to a millisecond late (epoll counts whole milliseconds), which would add
a millisecond to every hop, so delivery times are kept by a thread of the relay's
(``_Alarm``). Used by tests and benchmarks; torch-free.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import re
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 16 * 1024
_READ_AHEAD_S = 0.005
# The alarm waits out the last stretch before a delivery by polling the clock: a timed wait
# wakes up 0.1-0.4 ms late on a virtual machine.
_SPIN_S = 0.0005
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class LinkSpec:
    bandwidth_bps: float  # bits per second
    latency_s: float  # one way
    jitter_s: float = 0.0  # uniform in [0, jitter_s), never reorders bytes

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """``100mbit:20ms`` or ``20mbit:50ms:5ms`` (bandwidth:latency[:jitter])."""
        parts = text.strip().lower().split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"link spec must look like 100mbit:20ms[:5ms], got {text!r}")
        rate = _quantity(parts[0], _RATE_UNITS, "bandwidth", text)
        if rate <= 0:
            raise ValueError(f"link bandwidth must be positive, got {text!r}")
        times = [_quantity(p, _TIME_UNITS, "latency", text) for p in parts[1:]]
        return cls(rate, times[0], times[1] if len(times) > 1 else 0.0)


def _quantity(text: str, units: dict[str, float], what: str, spec: str) -> float:
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]+)", text)
    if not match or match.group(2) not in units:
        raise ValueError(f"{what} in link spec {spec!r} must be a number with a unit "
                         f"({', '.join(units)})")
    return float(match.group(1)) * units[match.group(2)]


class _Direction:
    """One direction of the shared link: when its wire is next free."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self.wire_free_at = 0.0
        self.bytes_carried = 0
        self.late_s = 0.0  # the wire stood idle while bytes waited for the relay

    @property
    def achieved_bps(self) -> float:
        """The rate the bytes carried so far really went at: their time on the wire plus
        the time the wire stood idle because the relay ran late (``bandwidth`` if none)."""
        if not self.bytes_carried:
            return self.spec.bandwidth_bps
        wire_s = self.bytes_carried * 8 / self.spec.bandwidth_bps
        return self.bytes_carried * 8 / (wire_s + self.late_s)

    def schedule(self, num_bytes: int, now: float) -> float:
        """Serialise ``num_bytes`` after what is already on the wire; -> delivery time."""
        self.bytes_carried += num_bytes
        start = max(now, self.wire_free_at)
        self.wire_free_at = start + num_bytes * 8 / self.spec.bandwidth_bps
        jitter = random.uniform(0.0, self.spec.jitter_s) if self.spec.jitter_s else 0.0
        return self.wire_free_at + self.spec.latency_s + jitter


class _Alarm:
    """Wakes asyncio tasks at a given ``time.monotonic()`` to within ~0.1 ms, from a thread
    (started on first use); asyncio's timers wake up to a millisecond late."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._order = itertools.count()  # ties in time wake in the order they were asked
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def sleep_until(self, when: float) -> None:
        if when <= time.monotonic():
            return
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="link-emulator-alarm",
                                                daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (when, next(self._order), loop, future))
            self._cond.notify()
        await future

    def close(self) -> None:
        """Ends the thread (its sleepers are cancelled tasks by now); a later sleep starts
        another."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        with self._cond:
            self._heap.clear()
            self._closed = False

    def _run(self) -> None:
        while (due := self._wait_for_due()) is not None:
            for _, _, loop, future in due:
                try:
                    loop.call_soon_threadsafe(_wake, future)
                except RuntimeError:  # that loop has closed: nobody is waiting any more
                    pass

    def _wait_for_due(self) -> list | None:
        """Blocks until some wake-ups are due -> them; None once closed."""
        while True:
            with self._cond:
                if self._closed:
                    return None
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap))
                if due:
                    return due
                wait = self._heap[0][0] - now - _SPIN_S if self._heap else None
                if wait is None or wait > 0:
                    self._cond.wait(wait)
                    continue
            time.sleep(0)  # within _SPIN_S of the next one: poll (without the lock or the GIL)


def _wake(future: asyncio.Future) -> None:
    if not future.done():  # a cancelled sleeper
        future.set_result(None)


class LinkEmulator:
    def __init__(self, spec: LinkSpec, target_host: str, target_port: int,
                 listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.spec = spec
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self._up, self._down = _Direction(spec), _Direction(spec)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._alarm = _Alarm()
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    def achieved_bps(self, upstream: bool = True) -> float:
        """The rate the link really carried its bytes at, toward the target (``upstream``)
        or back: below ``bandwidth`` when the relay ran late on a loaded machine."""
        return (self._up if upstream else self._down).achieved_bps

    def bytes_carried(self, upstream: bool = True) -> int:
        """Bytes the link has carried so far, toward the target (``upstream``) or back."""
        return (self._up if upstream else self._down).bytes_carried

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_connection, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._alarm.close()

    async def _on_connection(self, client_reader, client_writer) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            logger.warning("link emulator: cannot reach %s:%d: %s", *self.target, exc)
            client_writer.close()
            return
        for reader, writer, direction in ((client_reader, target_writer, self._up),
                                          (target_reader, client_writer, self._down)):
            task = asyncio.create_task(self._pump(reader, writer, direction))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader, writer, direction: _Direction) -> None:
        # The delay line holds what is "on the wire" (at most a bandwidth-delay product);
        # reading waits while the wire is busy, which back-pressures the sender.
        queue: asyncio.Queue = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(queue, writer))
        loop = asyncio.get_running_loop()
        last_read = None
        try:
            while True:
                waited = []  # this callback runs only if read() has to wait for bytes
                loop.call_soon(waited.append, True)
                if not (chunk := await reader.read(_CHUNK_BYTES)):
                    break
                now = time.monotonic()
                if not waited and last_read is not None:
                    # The bytes were here (since the last read at the latest) while the
                    # wire stood idle: the relay ran late.
                    direction.late_s += max(0.0, now - max(direction.wire_free_at, last_read))
                last_read = now
                queue.put_nowait((direction.schedule(len(chunk), now), chunk))
                # Read the next chunk a little before the wire frees up, so timer and read
                # delays never leave the wire idle; the lead is what the link buffers.
                busy_for = direction.wire_free_at - time.monotonic() - _READ_AHEAD_S
                if busy_for > 0:
                    await asyncio.sleep(busy_for)
            queue.put_nowait((0.0, b""))  # end of stream
            await deliver
        finally:
            deliver.cancel()

    async def _deliver(self, queue: asyncio.Queue, writer) -> None:
        try:
            while True:
                deliver_at, chunk = await queue.get()
                if not chunk:
                    break
                await self._alarm.sleep_until(deliver_at)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
