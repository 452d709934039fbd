"""The link relays: one LinkEmulator process per emulated link, counting the bytes it carries.

This module is also the relay process itself::

    python -m benchmarks.weak_links.relay SPEC LISTEN_PORT HOST:PORT STATS_FILE

which prints ``listening PORT`` once it accepts connections, then writes ``{"up": bytes,
"down": bytes}`` to STATS_FILE every 50 ms (up: client -> target, the data direction).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATS_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Relay:
    address: str  # where it listens, HOST:PORT
    stats: Path  # its byte counts, rewritten every STATS_INTERVAL_S
    pid: int

    def bytes_up(self) -> int:
        """Bytes carried in the data direction so far (0 before its first count)."""
        try:
            return json.loads(self.stats.read_text())["up"]
        except (OSError, ValueError, KeyError):
            return 0


class Relays:
    """The relay processes of this benchmark; ``stop_all`` ends each by its pid."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, name: str, link: str, target: str) -> Relay:
        """A relay emulating ``link`` in front of ``target`` (HOST:PORT)."""
        stats = self.log_dir / f"{name}.json"
        with (self.log_dir / f"{name}.log").open("ab") as log:  # the child keeps its own copy
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.weak_links.relay", link, "0", target,
                str(stats), cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=log)
        self.procs.append(proc)
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line.startswith(b"listening "):
            raise RuntimeError(f"relay {name} did not start: {line!r}")
        return Relay(f"127.0.0.1:{int(line.split()[1])}", stats, proc.pid)

    async def stop_all(self) -> None:
        # here, not at the top: the relay process itself needs neither torch nor gRPC
        from molink.entrypoints.local_pipeline import stop_processes

        await stop_processes(self.procs)
        self.procs.clear()


async def serve(spec_text: str, listen_port: int, target: str, stats_path: str) -> None:
    """The relay process: until SIGTERM or SIGINT."""
    from molink.transport.link_emulator import LinkEmulator, LinkSpec

    host, port = target.rsplit(":", 1)
    relay = LinkEmulator(LinkSpec.parse(spec_text), host, int(port), "127.0.0.1", listen_port)
    print(f"listening {await relay.start()}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    tmp = stats_path + ".tmp"
    while not stop.is_set():
        Path(tmp).write_text(json.dumps({"up": relay.bytes_carried(),
                                         "down": relay.bytes_carried(upstream=False)}))
        os.replace(tmp, stats_path)
        try:
            await asyncio.wait_for(stop.wait(), STATS_INTERVAL_S)
        except TimeoutError:
            pass
    await relay.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m benchmarks.weak_links.relay SPEC LISTEN_PORT HOST:PORT "
              "STATS_FILE", file=sys.stderr)
        return 2
    asyncio.run(serve(argv[0], int(argv[1]), argv[2], argv[3]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
