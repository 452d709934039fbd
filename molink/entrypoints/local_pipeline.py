"""A local pipeline: a head in this process, one ``molink join`` process per further stage.

Every process runs on one host (127.0.0.1 by default), exactly as it would on separate
machines: the stages join the head over gRPC with the cluster token, which they get from the
environment, never from the command line. Readiness comes from the head (every layer
joined), never from sleeping; a stage process that exits first ends the wait at once. Every
process started here is stopped here, by its pid, also on failure::

    head = PipelineHead(..., HeadConfig(head_layers=ranges[0]), PeerSecurity.create(token))
    async with LocalPipeline(head, token, model, ranges[1:], join_options=["--dtype", dt]):
        async for output in head.generate(prompt, params): ...

``molink demo``, the benchmarks and the multi-process tests start their pipelines here.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from molink import envs
from molink.coordinator.pipeline_head import PipelineHead
from molink.entrypoints.signals import finish_pending_tasks
from molink.runtime.host import cpu_cores

READY_TIMEOUT_S = 300.0
THREADS_VAR = "OMP_NUM_THREADS"
STOP_GRACE_S = 10.0  # after SIGTERM, how long a stage may take before it is killed
LOG_TAIL_LINES = 8


class StageExited(Exception):
    """A stage process ended before the pipeline was ready."""


class LocalPipeline:
    """The head (built, not started, by the caller) and its stage processes on one host.

    As an async context manager: start the head, one stage per range of ``stage_layers``,
    wait until ready; stop everything on exit. A caller that must act between those steps
    (the weak-links benchmark puts link relays in front of the stages) calls ``start_head``,
    ``start_stage``, ``wait_ready`` and ``stop`` itself.

    ``join_options``: further ``molink join`` options for every stage (``--dtype``...);
    ``env``: variables for the stage processes on top of this process's environment
    (``OMP_NUM_THREADS``, where neither sets it: each process's share of the cores);
    ``log_dir``: each stage's stdout and stderr go to ``stage<i>.log`` there (else stdout is
    discarded and stderr is this process's, so a stage's own error message shows)."""

    def __init__(self, head: PipelineHead, token: str, model: str | Path,
                 stage_layers: Sequence[tuple[int, int]] = (), *, host: str = "127.0.0.1",
                 join_options: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 log_dir: Path | None = None, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.head = head
        self.model = str(model)
        self.stage_layers = list(stage_layers)
        self.host = host
        self.join_options = list(join_options)
        self.env = {**os.environ, **(env or {}), envs.CLUSTER_TOKEN_VAR: token}
        # the processes share this machine's cores: each stage its share, unless told (a
        # stage with every core would spin its threads against the others': intra_op.py)
        self.env.setdefault(THREADS_VAR, str(fair_share(1 + len(self.stage_layers))))
        self.log_dir = log_dir
        self.ready_timeout_s = ready_timeout_s
        self.procs: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> Self:
        try:
            await self.start_head()
            for layers in self.stage_layers:
                await self.start_stage(layers)
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def start_head(self) -> int:
        """Start the head on an OS-chosen port of ``host``; -> that port."""
        return await self.head.start(self.host, 0)

    async def start_stage(self, layers: tuple[int, int], options: Sequence[str] = (),
                          head_address: str | None = None) -> asyncio.subprocess.Process:
        """One ``molink join`` process serving ``layers``; ``options`` for this stage only;
        ``head_address``: where it joins (default: where the head listens)."""
        command = [sys.executable, "-m", "molink.entrypoints.cli", "--log-level", "warning",
                   "join", self.model, "--head", head_address or self.head.address,
                   "--layers", f"{layers[0]}:{layers[1]}", "--host", self.host,
                   *self.join_options, *options]
        log = None
        if self.log_dir is not None:
            log = self._log_path(len(self.procs)).open("ab")  # the child keeps its own copy
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=log or asyncio.subprocess.DEVNULL, stderr=log)
        finally:
            if log is not None:
                log.close()
        self.procs.append(proc)
        return proc

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Until every layer is served: TimeoutError naming the missing layers, or
        StageExited as soon as a stage process exits first."""
        ready = asyncio.create_task(self.head.wait_ready(timeout_s or self.ready_timeout_s))
        exits = {asyncio.create_task(proc.wait()): i for i, proc in enumerate(self.procs)}
        try:
            done, _ = await asyncio.wait({ready, *exits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ready, *exits):
                task.cancel()
        if ready in done:
            ready.result()  # raises the TimeoutError
            return
        index = next(exits[task] for task in done if task in exits)
        code = self.procs[index].returncode
        raise StageExited(f"stage process {index + 1} exited with code {code} before the "
                          f"pipeline was ready{self._log_tail(index)}")

    async def stop(self) -> None:
        """Stop the stages (SIGTERM to each pid, SIGKILL after ``STOP_GRACE_S``), then the
        head, then let gRPC's last tasks end (else ``asyncio.run`` cancels them and gRPC
        logs CancelledError tracebacks). The head's first hop is closed first and the stages
        stop one by one in pipeline order: each closes its outgoing stream as it stops, so
        no stage stops while a stream into it is open (gRPC would abort it after its grace
        time with a warning, as it did under load when all stopped at once)."""
        await self.head.begin_stop()
        for proc in self.procs:  # pipeline order
            await stop_processes([proc])
        await self.head.stop()
        await finish_pending_tasks()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def _log_path(self, index: int) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"stage{index}.log"

    def _log_tail(self, index: int) -> str:
        if self.log_dir is None:
            return " (its message is above)"
        path = self._log_path(index)
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return ":\n" + "\n".join(lines[-LOG_TAIL_LINES:])


async def stop_processes(procs: Sequence[asyncio.subprocess.Process],
                         grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to each pid, then SIGKILL to any that has not ended ``grace_s`` later."""
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def fair_share(num_processes: int) -> int:
    """Cores per process when ``num_processes`` share the cores this process may use."""
    return max(1, cpu_cores() // num_processes)
