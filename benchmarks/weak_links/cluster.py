"""One pipeline of a run: a headless PipelineHead here, one ``molink join`` process per stage
and one relay process per emulated link (stage i -> i+1, last stage -> head)."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
from pathlib import Path

from benchmarks.weak_links.measurement import LinkSample, cpu_seconds, machine_busy_seconds
from benchmarks.weak_links.regimes import BLOCK_SIZE, Regime
from benchmarks.weak_links.relay import Relay, Relays
from benchmarks.weak_links.systems import Setting, System
from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.pipeline_head import PipelineHead
from molink.entrypoints.local_pipeline import LocalPipeline, StageExited
from molink.scheduler.placement import split_layers
from molink.transport.peers import PeerSecurity

TOKEN = "weak-links-benchmark"
READY_TIMEOUT_S = 120.0


class Pipeline:
    """Stage 1 shares the head's host: that hop has no relay. Every other link does."""

    def __init__(self, regime: Regime, setting: Setting, system: System, relays: Relays,
                 max_num_seqs: int) -> None:
        self.regime, self.setting, self.system = regime, setting, system
        self.relays = relays
        self.max_num_seqs = max_num_seqs
        self.ranges = split_layers(regime.num_layers, setting.num_stages)
        self.head: PipelineHead | None = None
        self.local: LocalPipeline | None = None
        self.links: list[Relay] = []  # pipeline order: into stage 2 .. into head

    async def start(self) -> None:
        self.head = PipelineHead(
            ModelConfig(model=str(self.regime.model_dir), dtype=self.regime.dtype, device="cpu"),
            CacheConfig(block_size=BLOCK_SIZE),
            SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=2048),
            HeadConfig(head_layers=None, **self.system.head_options(self.setting.num_stages)),
            security=PeerSecurity.create(TOKEN))
        log_dir = Path(tempfile.mkdtemp(prefix="pipeline-", dir=self.relays.log_dir))
        self.local = LocalPipeline(
            self.head, TOKEN, self.regime.model_dir, join_options=self._join_options(),
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, log_dir=log_dir)
        head_port = await self.local.start_head()
        direct = self.head.address
        ports = [free_port() for _ in self.ranges]
        targets = [*ports[1:], head_port]  # link j feeds stage j + 2; the last feeds the head
        self.links = list(await asyncio.gather(*(
            self.relays.start(f"{log_dir.name}-link{j + 1}", self.setting.link, f"127.0.0.1:{port}")
            for j, port in enumerate(targets))))
        # Results reach the head through the relay: the head tells the last stage to send
        # them to ``head.advertised_address`` (Configure), so that address must be the relay's.
        self.head.advertised_address = self.links[-1].address
        for i, layers in enumerate(self.ranges):
            advertise = ["--advertise", self.links[i - 1].address] if i else []
            await self.local.start_stage(layers, ["--peer-port", str(ports[i]), *advertise],
                                         head_address=direct)
        try:
            await self.local.wait_ready(READY_TIMEOUT_S)
        except (StageExited, TimeoutError) as exc:
            raise RuntimeError(f"pipeline did not become ready: {exc}") from None

    def _join_options(self) -> list[str]:
        options = ["--dtype", self.regime.dtype, "--max-num-seqs", str(self.max_num_seqs)]
        if self.regime.quantization:
            options += ["--quantization", self.regime.quantization]
        if self.regime.emulate:
            return [*options, "--emulate-device", self.regime.emulate]
        return [*options, "--device", "cpu", "--num-kv-blocks", str(self.regime.num_kv_blocks)]

    def link_sample(self) -> LinkSample:
        """Relay bytes and the tokens the library sent on each emulated link (hop_stats
        minus the head's own first hop, which has no relay)."""
        return LinkSample([link.bytes_up() for link in self.links],
                          [hop.tokens_sent for hop in self.head.hop_stats()[1:]])

    def cpu_snapshot(self) -> dict[str, float]:
        """CPU seconds so far: this process, stages, relays, and every process ("machine")."""
        return {"head": time.process_time(),
                "stages": sum(cpu_seconds(p) for p in self.local.pids),
                "relays": sum(cpu_seconds(link.pid) for link in self.links),
                "machine": machine_busy_seconds()}

    def describe_hops(self) -> list[str]:
        described = []
        for hop in self.head.hop_stats():
            per_token = hop.bytes_sent / hop.tokens_sent if hop.tokens_sent else 0
            described.append(f"{hop.label}: {per_token:.0f} B/token, {hop.compression}")
        return described

    def decode_step_totals(self) -> tuple[int, list[float]]:
        """Decode steps so far and each stage's compute seconds in them."""
        totals = self.head.breakdown.totals.get("decode")
        return (totals.count, list(totals.compute_s)) if totals else (0, [])

    def window_step_ms(self, before: tuple[int, list[float]]) -> tuple[list[float], int]:
        """Each stage's mean decode step (ms) since ``before``, and how many steps."""
        count0, compute0 = before
        count1, compute1 = self.decode_step_totals()
        steps = count1 - count0
        if steps <= 0:
            return [], 0
        compute0 = compute0 or [0.0] * len(compute1)
        return [1e3 * (b - a) / steps for a, b in zip(compute0, compute1)], steps

    def microbatches(self) -> str:
        stats = self.head.stats
        return f"{self.head.num_microbatches} (max in flight {stats.max_microbatches_in_flight})"

    async def stop(self) -> None:
        """The stages and the head; the relays are stopped by their owner."""
        if self.local is not None:
            await self.local.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

