"""The two clusters under test, and each system alone in one process (the compute bound).

Both put the same relay (``benchmarks.weak_links.relay``, a LinkEmulator process) in front of
every node that receives data; the HTTP client talks to the head directly::

    llama.cpp RPC   llama-server (layers 0:4) <-relay-> rpc-server A (layers 4:8)
                                              <-relay-> rpc-server B (layers 8:12, output)
    MoLink          head (0:4) -relay-> stage 2 (4:8) -relay-> stage 3 (8:12, output)
                         ^------------------------relay-----------------'

llama-server is the RPC client: each step it sends activations to A, fetches them back, sends
them to B, fetches them back (request/response, both directions through the relay). MoLink
sends each hop one way: its relays carry data forward and only acknowledgements back.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.peers.llama_cpp import LlamaCpp, log
from benchmarks.peers.processes import Processes, ProcessExited, free_port
from benchmarks.weak_links.relay import Relay, Relays
from molink import envs

READY_TIMEOUT_S = 600.0  # a 20 Mbit/s link carries llama.cpp's weights to an rpc-server
TOKEN = "peers-benchmark"
MODEL_NAME = "peers"


@dataclass(frozen=True)
class Setup:
    """What every cluster of a run shares."""

    model_dir: Path  # the Hugging Face checkpoint (MoLink)
    llama: LlamaCpp | None  # None: MoLink only
    threads: int  # per node
    max_num_seqs: int
    max_model_len: int  # prompt + output, with headroom
    log_dir: Path
    llama_output: str = "last"  # llama.cpp's output layer: on rpc-server B, or "head"
    head_options: tuple[str, ...] = ()  # MoLink: ``molink serve``'s only (the head's)
    # MoLink: the CPUs of each node (head, stage 2, stage 3; ``own_cpus``); () = unpinned
    cpus: tuple[frozenset[int], ...] = ()


class Cluster:
    """Servers and relays of one system at one link; ``stop`` ends every process by pid."""

    label = ""
    front = ""  # the process the HTTP client talks to, stopped first

    def __init__(self, setup: Setup, link: str | None, log_dir: Path) -> None:
        self.setup, self.link = setup, link
        self.procs = Processes(log_dir)
        self.relays = Relays(log_dir)
        self.links: list[Relay] = []
        self.http_port = free_port()
        self.notes: list[str] = []  # what the servers' logs say about the layer split

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def relay_to(self, name: str, port: int) -> str:
        """A relay emulating ``self.link`` in front of 127.0.0.1:``port``; -> its address."""
        relay = await self.relays.start(name, self.link, f"127.0.0.1:{port}")
        self.links.append(relay)
        return relay.address

    async def stop(self) -> None:
        try:
            await self.procs.stop_all(first=self.front)
        finally:
            await self.relays.stop_all()


class LlamaCppRpc(Cluster):
    """``gguf`` served by llama-server; with a link, layers 4:12 on two rpc-servers."""

    label = "llama.cpp"
    front = "llama-server"

    def __init__(self, setup: Setup, link: str | None, log_dir: Path, gguf: Path,
                 num_layers: int) -> None:
        super().__init__(setup, link, log_dir)
        self.gguf, self.num_layers = gguf, num_layers
        self.repack_note: str | None = None

    async def start(self) -> None:
        threads = str(self.setup.threads)
        rpc = []
        if self.link is not None:
            for name in ("rpc-a", "rpc-b"):
                port = free_port()
                # -c: weights cached on the rpc-server's disk, as a MoLink stage reads its own
                # copy of the checkpoint (loading is not measured)
                await self.procs.start(name, [str(self.setup.llama.rpc_server), "-H",
                                              "127.0.0.1", "-p", str(port), "-t", threads, "-c"])
                await self.procs.wait_port(name, port, 60)
                rpc.append(await self.relay_to(f"into-{name}", port))
        command = self._server_command(rpc)
        await self.procs.start("llama-server", command)
        try:
            await self.procs.wait_http("llama-server", f"{self.base_url}/health",
                                       READY_TIMEOUT_S)
        except ProcessExited:
            if self.procs.procs["llama-server"].returncode != -signal.SIGSEGV:
                raise
            # llama.cpp 0.3.36 crashes in its warm-up on a Xeon with AMX with Q8_0 weights
            # repacked for the CPU; it serves them as stored (--no-repack)
            self.repack_note = ("llama-server crashed (SIGSEGV) in its warm-up with weights "
                                "repacked for this CPU; it ran with --no-repack")
            crashed = self.procs.log_path("llama-server-crashed")
            self.procs.log_path("llama-server").rename(crashed)
            log(f"{self.repack_note} ({crashed})")
            await self.procs.start("llama-server", [*command, "--no-repack"])
            await self.procs.wait_http("llama-server", f"{self.base_url}/health",
                                       READY_TIMEOUT_S)

    async def stop(self) -> None:
        """Then read the split from llama-server's log: it prints each device's memory as it
        exits (hence it stops before its rpc-servers)."""
        await super().stop()
        self.notes = [*([self.repack_note] if self.repack_note else []),
                      *split_lines(self.procs.log_path("llama-server"))]

    def _server_command(self, rpc: list[str]) -> list[str]:
        setup = self.setup
        command = [str(setup.llama.server), "-m", str(self.gguf), "--host", "127.0.0.1",
                   "--port", str(self.http_port), "-t", str(setup.threads), "-tb",
                   str(setup.threads), "-c", str(setup.max_num_seqs * setup.max_model_len),
                   "-np", str(setup.max_num_seqs), "-cb", "-fit", "off", "-cram", "0",
                   "--no-webui", "-lv", "4"]  # -lv 4: the offload and buffer lines
        if not rpc:
            return [*command, "-ngl", "0"]
        return [*command, "--rpc", ",".join(rpc), *rpc_split(self.num_layers),
                *(["-ot", "^output=CPU"] if setup.llama_output == "head" else [])]


def rpc_split(num_layers: int) -> list[str]:
    """llama.cpp options that put layers third:2*third on rpc-server A, the rest and the
    output layer on B, as MoLink's stages. ``-ngl`` counts layers from the end, the output
    layer (index ``num_layers``) included; layer i goes to the first device whose cumulative
    ``-ts`` share exceeds (i - first offloaded) / offloaded::

        offloaded = 2 * third + 1         (layers third .. num_layers - 1, then the output)
        -ts third,third+1: A's share = third / offloaded
        A: (i - third) / offloaded < third / offloaded  <=>  i < 2 * third
    """
    third = num_layers // 3
    return ["-ngl", str(2 * third + 1), "-ts", f"{third},{third + 1}"]


class MolinkPipeline(Cluster):
    """``molink serve`` (layers 0:4) + two ``molink join``; without a link, ``serve`` alone
    with every layer."""

    label = "MoLink"
    front = "head"

    def __init__(self, setup: Setup, link: str | None, log_dir: Path, options: list[str],
                 num_layers: int, head_options: list[str] = ()) -> None:
        """``options``: every node's; ``head_options``: ``molink serve``'s only."""
        super().__init__(setup, link, log_dir)
        self.options, self.num_layers = options, num_layers
        self.head_options = list(head_options)

    async def start(self) -> None:
        env = {**os.environ, envs.CLUSTER_TOKEN_VAR: TOKEN,
               "OMP_NUM_THREADS": str(self.setup.threads),
               "MKL_NUM_THREADS": str(self.setup.threads)}
        head_port = free_port()
        serve = ["serve", str(self.setup.model_dir), "--port", str(self.http_port),
                 "--peer-port", str(head_port), "--served-model-name", MODEL_NAME,
                 "--disable-log-requests", *self.head_options]
        cpus = list(self.setup.cpus) or [frozenset()] * 3
        if self.link is None:
            await self.procs.start("head", self._command(serve), env, cpus[0])
        else:
            third = self.num_layers // 3
            ranges = [(third, 2 * third), (2 * third, self.num_layers)]
            ports = [free_port() for _ in ranges]
            into_stages = [await self.relay_to(f"into-stage{i + 2}", port)
                           for i, port in enumerate(ports)]
            # the last stage sends results to the head's advertised address: the relay
            into_head = await self.relay_to("into-head", head_port)
            await self.procs.start("head", self._command(
                [*serve, "--layers", f"0:{third}", "--advertise", into_head]), env, cpus[0])
            for i, (layers, port) in enumerate(zip(ranges, ports, strict=True)):
                await self.procs.start(f"stage{i + 2}", self._command(
                    ["join", str(self.setup.model_dir), "--head", f"127.0.0.1:{head_port}",
                     "--layers", f"{layers[0]}:{layers[1]}", "--peer-port", str(port),
                     "--advertise", into_stages[i]]), env, cpus[i + 1])
        await self.procs.wait_http("head", f"{self.base_url}/health", READY_TIMEOUT_S)

    def _command(self, args: list[str]) -> list[str]:
        setup = self.setup
        blocks = setup.max_num_seqs * (-(-setup.max_model_len // 16))
        return [sys.executable, "-m", "molink.entrypoints.cli", "--log-level", "warning",
                *args, "--host", "127.0.0.1", "--device", "cpu", *self.options,
                "--max-num-seqs", str(setup.max_num_seqs),
                "--max-model-len", str(setup.max_model_len), "--num-kv-blocks", str(blocks)]


def split_lines(log: Path) -> list[str]:
    """llama-server's own account of where the layers went (offload count, buffers)."""
    keys = ("offloaded", "model buffer size", "KV buffer size", "memory_breakdown")
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [line.strip() for line in lines if any(k in line for k in keys)]
