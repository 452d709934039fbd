"""Weak links: sequential vs FIFO pipeline vs MoLink over slow links, against the bound.

One run measures, side by side on the same machine, model and workload (issue #8):

  (a) sequential     the same engine and continuous batching, exactly one micro-batch in
                     the pipeline at a time, first-in first-out sends (how llama.cpp's RPC
                     backend and Petals run)
  (b) FIFO pipeline  micro-batches = number of stages, first-in first-out sends, no chunking,
                     no compression (how vLLM's pipeline parallelism runs)
  (c) MoLink         everything on (measured micro-batching, decode-first link scheduling
                     with just-in-time prefill chunks, activation compression), plus
                     ablations that turn one technique off at a time

in two regimes. *Emulated GPUs*: Qwen2.5-32B (or Llama-2-70B) on emulated RTX 3090 stages
(``molink join --emulate-device rtx3090``: a stage waits what the roofline profile predicts
instead of computing). *Real CPU*: a random Llama (hidden 1,024, 12 layers, float32), each
stage a ``molink join`` process with one thread. The head runs in this process without
layers (co-located with stage 1: that hop has no emulated link); every other link (stage
i -> i+1 and last stage -> head) goes through its own LinkEmulator relay process
(bandwidth + one-way latency), which also counts the bytes that cross it.

Workloads: *decode-heavy*: N requests at once (512 emulated, 256 CPU), 16-token prompts,
outputs that last past the measured window; measured once every request got its first
token. N is chosen so that the concurrency term of the bound does not bind: with 512
requests and a ~130 ms round trip it is ~4,000 tokens/s, above the 100 Mbit link's ~2,400
(int8) and the stages' ~3,400, so the bound is set by the hardware, not by the client; on
CPU, 256 = two micro-batches of the most efficient batch (128) keep both cores busy.
*Mixed*: Poisson arrivals offering half of (b)'s capacity, ShareGPT-like log-normal lengths,
every tenth prompt long (1,000-2,000 tokens); the same requests at the same times for every
system of a setting.

The bound, printed per setting: every stage's capacity (tokens/s if it were never idle, at
the best batch size: from the device profile, or from single-thread step times measured in
this process before any run), every link's capacity (bandwidth / bytes per token that
actually crossed that relay in (c)'s decode-heavy window) and N / the shortest time for one
token to go round the pipeline. For CPU runs the stages share the machine's cores, so the
compute term is the machine's (cores x best tokens/s of all layers on one core). Each
system's fraction of the bound is printed next to it.

    python benchmarks/weak_links.py           # ~40 min; benchmarks/results/weak_links.md (+ PNGs)
    python benchmarks/weak_links.py --quick   # < 3 min: emulated 3 stages 100mbit:20ms ((a)
                                              # decode, (b) mixed, (c) both) + CPU (c) decode;
                                              # prints only; last line: one JSON object
    python benchmarks/weak_links.py --regime emulated --stages 3 --links 20mbit:50ms

Windows are short (8 s decode-heavy, 32 mixed requests; --quick: 6 s, 16 requests) so the
default grid fits in ~40 min on 2 cores (see ``--full-grid`` for what it leaves out); every
number comes from the run that prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import dataclasses
import itertools
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "benchmarks" / "configs"
TOKENIZER_DIR = ROOT / "molink" / "assets" / "default_model"
TOKEN = "weak-links-benchmark"
LINKS = ("1gbit:1ms", "100mbit:20ms", "20mbit:50ms")
STAGE_COUNTS = (2, 3, 4)
TARGET_LINK, TARGET_STAGES = "100mbit:20ms", 3
BLOCK_SIZE = 16
MIN_WINDOW_TOKENS = 4  # per request in the decode-heavy window: three gaps for its rate
FIRST_TOKEN_ID = 6  # prompts use ids >= 6: below are special tokens in both tokenizers


# ---- what is compared ---------------------------------------------------------------------


@dataclass(frozen=True)
class System:
    key: str
    label: str
    microbatches: str  # "one" | "stages" | "auto" (the measured chooser)
    link_schedule: str  # "molink" | "priority" | "fifo"
    compression: str  # "auto" | "none" | ...


SYSTEMS = {s.key: s for s in (
    System("a", "(a) sequential", "one", "fifo", "none"),
    System("b", "(b) FIFO pipeline", "stages", "fifo", "none"),
    System("c", "(c) MoLink", "auto", "molink", "auto"),
    System("c-stages-mb", "(c) w/o measured micro-batching (= stages)", "stages", "molink", "auto"),
    System("c-priority", "(c) w/o just-in-time chunking (decode-first only)", "auto", "priority",
           "auto"),
    System("c-fifo", "(c) w/o link scheduling (FIFO)", "auto", "fifo", "auto"),
    System("c-no-compression", "(c) w/o compression", "auto", "molink", "none"),
)}
MAIN_SYSTEMS = ("a", "b", "c")
ABLATIONS = ("c-stages-mb", "c-priority", "c-fifo", "c-no-compression")


@dataclass(frozen=True)
class Setting:
    regime: str  # "emulated" | "cpu"
    num_stages: int
    link: str

    @property
    def name(self) -> str:
        return f"{self.regime}, {self.num_stages} stages, {self.link}"

    @property
    def is_target(self) -> bool:
        return (self.link, self.num_stages) == (TARGET_LINK, TARGET_STAGES)


@dataclass(frozen=True)
class Job:
    """One pipeline start: a system on a setting, running some workloads in turn."""

    setting: Setting
    system: System
    workloads: tuple[str, ...]  # "decode" | "mixed"


@dataclass(frozen=True)
class Timing:
    """How long each part of a run may take (shorter in --quick)."""

    decode_window_s: float
    decode_window_max_s: float
    settle_s: float
    first_token_timeout_s: float
    mixed_requests: int
    mixed_drain_s: float
    mixed_output_cap: int


# ---- measurements -----------------------------------------------------------------------


@dataclass
class Trace:
    """One request as the client saw it."""

    prompt_len: int
    submitted: float = 0.0
    token_times: list[float] = field(default_factory=list)
    finished: bool = False
    error: str = ""


@dataclass
class RunResult:
    setting: Setting
    system: System
    workload: str
    ok: bool = True
    error: str = ""
    throughput: float = 0.0  # output tokens/s in the measured window
    window_s: float = 0.0
    ttft: tuple[float, float] | None = None  # p50, p99 seconds
    tpot: tuple[float, float] | None = None
    itl: tuple[float, float] | None = None  # gaps between a request's consecutive tokens
    e2e: tuple[float, float] | None = None
    num_requests: int = 0
    num_unfinished: int = 0
    mean_context: float = 0.0  # tokens of context per decode token, mid-window
    hop_bytes_per_token: list[float] = field(default_factory=list)  # relay-counted, per link
    library_hops: list[str] = field(default_factory=list)  # head.hop_stats() if it exists
    num_microbatches: str = ""
    stage_step_ms: list[float] = field(default_factory=list)  # the head's EWMA per stage
    cpu_percent: dict[str, float] = field(default_factory=dict)  # % of one core in the window
    notes: list[str] = field(default_factory=list)


def percentiles(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        low = math.floor(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return at(0.5), at(0.99)


# ---- the relay subprocess ---------------------------------------------------------------


def run_relay(spec_text: str, listen_port: int, target: str, stats_path: str) -> int:
    """``--relay``: one LinkEmulator in this process, counting the bytes that cross it.

    Prints ``listening PORT`` once it accepts connections; writes ``{"up": bytes, "down":
    bytes}`` to ``stats_path`` every 50 ms (up: client -> target, the data direction)."""
    from molink.transport import link_emulator

    class CountingDirection(link_emulator._Direction):
        num_bytes = 0

        def schedule(self, num_bytes: int, now: float) -> float:
            self.num_bytes += num_bytes
            return super().schedule(num_bytes, now)

    async def main() -> None:
        spec = link_emulator.LinkSpec.parse(spec_text)
        host, port = target.rsplit(":", 1)
        relay = link_emulator.LinkEmulator(spec, host, int(port), "127.0.0.1", listen_port)
        # The emulator has no byte counters; counting subclasses of its per-direction state.
        relay._up, relay._down = CountingDirection(spec), CountingDirection(spec)
        print(f"listening {await relay.start()}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        tmp = stats_path + ".tmp"
        while not stop.is_set():
            Path(tmp).write_text(json.dumps({"up": relay._up.num_bytes,
                                             "down": relay._down.num_bytes}))
            os.replace(tmp, stats_path)
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except TimeoutError:
                pass
        await relay.stop()

    asyncio.run(main())
    return 0


# ---- processes ----------------------------------------------------------------------------


class Children:
    """Every process this benchmark starts; ``stop_all`` ends each by its pid."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, asyncio.subprocess.Process]] = []

    async def spawn(self, name: str, args: list[str], env: dict | None = None,
                    pipe_stdout: bool = False) -> asyncio.subprocess.Process:
        log = self._open_log(name)
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if pipe_stdout else log, stderr=log)
        finally:
            log.close()
        self.procs.append((name, proc))
        return proc

    def _open_log(self, name: str):
        return (self.log_dir / f"{name}.log").open("ab")  # the child keeps its own copy

    def log_tail(self, name: str, num_lines: int = 8) -> str:
        path = self.log_dir / f"{name}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-num_lines:])

    async def stop_all(self) -> None:
        for _, proc in self.procs:
            if proc.returncode is None:
                proc.terminate()  # SIGTERM to that pid only
        for _, proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine_busy_seconds() -> float:
    """CPU seconds every process on this machine has used (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


# ---- models and regimes -----------------------------------------------------------------


@dataclass
class Regime:
    name: str
    model_dir: Path
    dtype: str
    prompt_vocab: int
    hidden_size: int
    num_layers: int
    element_bytes: int
    concurrency: int  # decode-heavy requests in flight
    emulate: str | None = None  # device profile name for emulated stages
    profile: object = None  # DeviceProfile (emulated)
    cpu_steps: dict = field(default_factory=dict)  # (start, end) -> CpuStageTimes
    cpu_context: int = 0
    num_kv_blocks: int | None = None
    description: str = ""

    def step_s(self, layers: tuple[int, int], batch: int, context: float) -> float:
        """One decode step of ``batch`` requests with ``context`` tokens each."""
        if self.profile is not None:
            return self.profile.step_ms(layers[1] - layers[0], batch, 0, batch * context) / 1e3
        return self.cpu_steps[layers].decode_s(batch)

    def prefill_tokens_per_s(self, layers: tuple[int, int], chunk: int) -> float:
        if self.profile is not None:
            return chunk / (self.profile.step_ms(layers[1] - layers[0], 0, chunk, 0) / 1e3)
        return self.cpu_steps[layers].prefill_tokens_per_s


def split_layers(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Near-equal contiguous ranges, earlier stages taking the extra layers."""
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for i in range(num_stages):
        end = start + base + (i < extra)
        ranges.append((start, end))
        start = end
    return ranges


def emulated_regime(config_name: str, work: Path, profile_name: str,
                    concurrency: int) -> Regime:
    """A model directory with the real config (vocab replaced) and the bundled tokenizer."""
    from molink.model.loader import load_config
    from molink.runtime.device_profile import DeviceProfile

    directory = work / f"emulated-{config_name}"
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((CONFIGS / f"{config_name}.json").read_text())
    tokenizer_vocab = json.loads((TOKENIZER_DIR / "config.json").read_text())["vocab_size"]
    original_vocab = config["vocab_size"]
    # The head detokenizes the stages' pseudo tokens with the bundled tokenizer; only the
    # vocabulary (sampling, which emulation does not compute) changes, not the layers.
    config.update(vocab_size=tokenizer_vocab, bos_token_id=0, eos_token_id=1)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, directory / name)
    arch = load_config(str(directory)).arch
    profile = DeviceProfile.load(profile_name, arch)
    return Regime("emulated", directory, "bfloat16", tokenizer_vocab, arch.hidden_size,
                  arch.num_layers, 2, concurrency, emulate=profile_name, profile=profile,
                  description=(
                      f"{config_name} (hidden {arch.hidden_size}, {arch.num_layers} layers, "
                      f"{arch.num_heads} heads, {arch.num_kv_heads} KV heads, intermediate "
                      f"{arch.intermediate_size}), bfloat16 activations, stages emulate "
                      f"`{profile_name}` ({profile.name}); vocab_size {original_vocab} replaced "
                      f"by the bundled tokenizer's {tokenizer_vocab} so pseudo tokens "
                      "detokenize (affects only sampling, which emulation does not compute)"))


def build_cpu_model(hidden: int, layers: int, vocab: int) -> Path:
    """A random-weight Llama, cached in the temp dir between runs (building takes a while)."""
    directory = Path(tempfile.gettempdir()) / f"molink-weak-links-llama-h{hidden}-l{layers}-v{vocab}"
    if (directory / "complete").exists():
        return directory
    from benchmarks.engine_throughput import build_model

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    build_model(directory, hidden, layers, vocab, max_position_embeddings=4096)
    (directory / "complete").write_text("ok")
    return directory


@dataclass
class CpuStageTimes:
    """Single-thread step times of one stage, measured in this process before any run."""

    decode: dict[int, float]  # batch -> seconds per decode step
    prefill_tokens_per_s: float

    def decode_s(self, batch: int) -> float:
        points = sorted(self.decode.items())
        if batch <= points[0][0]:
            return points[0][1]
        for (b0, t0), (b1, t1) in itertools.pairwise(points):
            if batch <= b1:
                return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
        b_last, t_last = points[-1]
        return t_last * batch / b_last


def measure_cpu_stage(model_dir: Path, layers: tuple[int, int], batches: list[int],
                      context: int, prefill_tokens: int, reps: int) -> CpuStageTimes:
    """Decode steps at each batch size (context filled with uninitialised KV: same cost)."""
    import torch

    from molink.config import CacheConfig, ModelConfig
    from molink.messages import BatchEntry, NewRequest, StepPlan
    from molink.runtime.stage_executor import StageExecutor
    from molink.sampling_params import SamplingParams

    torch.set_num_threads(1)
    per_request = -(-(max(context, prefill_tokens) + 1) // BLOCK_SIZE)
    executor = StageExecutor(
        ModelConfig(model=str(model_dir), dtype="float32", device="cpu", start_layer=layers[0],
                    end_layer=layers[1]),
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=per_request * max(batches)),
        max_num_seqs=max(batches))
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    steps = iter(range(1, 10**9))

    def run(ids: list[str], length: int, num_tokens: int, count: int) -> float:
        new = [NewRequest(rid, [FIRST_TOKEN_ID + 1] * length, length, params,
                          list(range(i * per_request, (i + 1) * per_request)))
               for i, rid in enumerate(ids)]
        batch = [BatchEntry(rid, length - num_tokens, num_tokens, True) for rid in ids]
        hidden = None if executor.is_first else torch.randn(
            len(ids) * num_tokens, executor.arch.hidden_size)  # [tokens, hidden]
        executor.execute(StepPlan(next(steps), batch, new_requests=new), hidden)  # warm-up
        times = []
        for _ in range(count):
            start = time.perf_counter()
            executor.execute(StepPlan(next(steps), batch), hidden)
            times.append(time.perf_counter() - start)
        executor.execute(StepPlan(next(steps), [], freed_request_ids=ids))
        return min(times)  # the least disturbed by other processes: a bound is optimistic

    decode = {b: run([f"d{b}-{i}" for i in range(b)], context + 1, 1, reps) for b in batches}
    prefill_s = run(["p"], prefill_tokens, prefill_tokens, max(1, reps - 1))
    return CpuStageTimes(decode, prefill_tokens / prefill_s)


def cpu_regime(args, stage_counts: list[int]) -> Regime:
    directory = build_cpu_model(args.cpu_hidden, args.cpu_layers, args.cpu_vocab)
    regime = Regime("cpu", directory, "float32", args.cpu_vocab, args.cpu_hidden, args.cpu_layers,
                    4, args.cpu_concurrency, num_kv_blocks=args.cpu_kv_blocks,
                    cpu_context=args.prompt_len + 64,
                    description=(f"random Llama (hidden {args.cpu_hidden}, {args.cpu_layers} "
                                 f"layers, vocab {args.cpu_vocab}), float32, CPU, one thread "
                                 "(OMP_NUM_THREADS=1) per stage process"))
    batches = sorted({1, 8, 32, 64, 128, args.cpu_concurrency})
    if args.quick:
        batches = sorted({1, 32, 128, args.cpu_concurrency})
    ranges = {r for n in stage_counts for r in split_layers(args.cpu_layers, n)}
    print(f"[cpu] measuring single-thread step times of {len(ranges)} layer ranges "
          f"(batches {batches}, context {regime.cpu_context})", flush=True)
    for layers in sorted(ranges):
        regime.cpu_steps[layers] = measure_cpu_stage(
            directory, layers, batches, regime.cpu_context, 256, 3)
        times = regime.cpu_steps[layers]
        print(f"  layers {layers[0]}:{layers[1]}: " + ", ".join(
            f"b={b} {t * 1e3:.1f} ms" for b, t in sorted(times.decode.items()))
            + f"; prefill {times.prefill_tokens_per_s:.0f} tokens/s", flush=True)
    return regime


# ---- the pipeline ---------------------------------------------------------------------------


def head_options(system: System, num_stages: int) -> tuple[dict, list[str]]:
    """PipelineHead keyword arguments for a system; notes for options this library lacks."""
    from molink.coordinator.head_config import HeadConfig

    supported = {field.name for field in dataclasses.fields(HeadConfig)}
    count = {"one": 1, "stages": num_stages, "auto": None}[system.microbatches]
    options, notes = {"num_microbatches": count}, []
    for name in ("link_schedule", "compression"):
        value = getattr(system, name)
        if name in supported:
            options[name] = value
        else:
            notes.append(f"library has no `{name}` option: ran without setting it "
                         f"(wanted {value!r})")
    return options, notes


class Pipeline:
    """A headless PipelineHead here, one ``molink join`` process per stage, one relay
    process per emulated link (stage i -> i+1, last stage -> head)."""

    def __init__(self, regime: Regime, setting: Setting, system: System, children: Children,
                 max_num_seqs: int) -> None:
        self.regime, self.setting, self.system = regime, setting, system
        self.children = children
        self.max_num_seqs = max_num_seqs
        self.ranges = split_layers(regime.num_layers, setting.num_stages)
        self.head = None
        self.notes: list[str] = []
        self.relay_stats: list[Path] = []  # pipeline order: into stage 2 .. into head
        self.stage_pids: list[int] = []
        self.relay_pids: list[int] = []

    async def start(self) -> None:
        from molink.config import CacheConfig, ModelConfig, SchedulerConfig
        from molink.coordinator.head_config import HeadConfig
        from molink.coordinator.pipeline_head import PipelineHead
        from molink.transport.peers import PeerSecurity

        options, self.notes = head_options(self.system, self.setting.num_stages)
        self.head = PipelineHead(
            ModelConfig(model=str(self.regime.model_dir), dtype=self.regime.dtype, device="cpu"),
            CacheConfig(block_size=BLOCK_SIZE),
            SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=2048),
            HeadConfig(head_layers=None, **options), security=PeerSecurity.create(TOKEN))
        head_port = await self.head.start("127.0.0.1", 0)
        direct = f"127.0.0.1:{head_port}"
        ports = [free_port() for _ in self.ranges]
        targets = [*ports[1:], head_port]  # link j feeds stage j + 2; the last feeds the head
        relays = await asyncio.gather(*(self._relay(f"link{j + 1}", port)
                                        for j, port in enumerate(targets)))
        addresses = [address for address, _, _ in relays]
        self.relay_stats = [stats for _, stats, _ in relays]
        self.relay_pids = [pid for _, _, pid in relays]
        # Results reach the head through the relay: the head tells the last stage to send
        # them to ``head.address`` (Configure), so that address must be the relay's.
        self.head.advertised_address = addresses[-1]
        procs = [await self._stage(i, layers, ports[i], addresses[i - 1] if i else None, direct)
                 for i, layers in enumerate(self.ranges)]
        ready = asyncio.create_task(self.head.wait_ready(120))
        exits = [asyncio.create_task(proc.wait()) for proc in procs]
        try:
            await asyncio.wait([ready, *exits], return_when=asyncio.FIRST_COMPLETED)
            if not ready.done() or ready.exception() is not None:
                tails = "\n".join(self.children.log_tail(f"stage{i}-{id(self)}")
                                  for i in range(len(self.ranges)))
                raise RuntimeError(f"pipeline did not become ready (a stage exited or "
                                   f"timed out):\n{tails}")
        finally:
            for task in (ready, *exits):
                task.cancel()

    async def _relay(self, name: str, target_port: int) -> tuple[str, Path, int]:
        """-> (listening address, stats file, pid) of a new relay in front of target_port."""
        stats = self.children.log_dir / f"{name}-{id(self)}.json"
        proc = await self.children.spawn(
            f"{name}-{id(self)}", [sys.executable, str(Path(__file__).resolve()), "--relay",
                                   self.setting.link, "0", f"127.0.0.1:{target_port}",
                                   "--relay-stats", str(stats)], pipe_stdout=True)
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line.startswith(b"listening "):
            raise RuntimeError(f"relay {name} did not start: {line!r}")
        return f"127.0.0.1:{int(line.split()[1])}", stats, proc.pid

    async def _stage(self, index: int, layers: tuple[int, int], port: int, advertise: str | None,
                     head: str) -> asyncio.subprocess.Process:
        args = [sys.executable, "-m", "molink.entrypoints.cli", "--log-level", "warning", "join",
                str(self.regime.model_dir), "--head", head, "--layers", f"{layers[0]}:{layers[1]}",
                "--host", "127.0.0.1", "--peer-port", str(port), "--cluster-token", TOKEN,
                "--dtype", self.regime.dtype, "--max-num-seqs", str(self.max_num_seqs)]
        if advertise:
            args += ["--advertise", advertise]
        if self.regime.emulate:
            args += ["--emulate-device", self.regime.emulate]
        else:
            args += ["--device", "cpu", "--num-kv-blocks", str(self.regime.num_kv_blocks)]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = await self.children.spawn(f"stage{index}-{id(self)}", args, env=env)
        self.stage_pids.append(proc.pid)
        return proc

    def link_bytes(self) -> list[int]:
        """Bytes that crossed each relay in the data direction, pipeline order."""
        counts = []
        for path in self.relay_stats:
            try:
                counts.append(json.loads(path.read_text())["up"])
            except (OSError, ValueError, KeyError):
                counts.append(0)
        return counts

    def link_sample(self) -> tuple[list[int], list[int] | None]:
        return self.link_bytes(), self.hop_tokens()

    def hop_tokens(self) -> list[int] | None:
        """Tokens the library sent on each emulated link (hop_stats minus the head's own
        first hop), pipeline order; None if this library has no hop_stats."""
        hop_stats = getattr(self.head, "hop_stats", None)
        if hop_stats is None:
            return None
        return [hop.tokens_sent for hop in hop_stats()[1:]]

    def cpu_snapshot(self) -> dict[str, float]:
        """CPU seconds so far: this process, stages, relays, and every process ("machine")."""
        return {"head": time.process_time(),
                "stages": sum(cpu_seconds(p) for p in self.stage_pids),
                "relays": sum(cpu_seconds(p) for p in self.relay_pids),
                "machine": machine_busy_seconds()}

    def describe_hops(self) -> list[str]:
        hop_stats = getattr(self.head, "hop_stats", None)
        if hop_stats is None:
            return []
        described = []
        for hop in hop_stats():
            per_token = hop.bytes_sent / hop.tokens_sent if hop.tokens_sent else 0
            described.append(f"{hop.label}: {per_token:.0f} B/token, {hop.compression}")
        return described

    def stage_step_ms(self) -> list[float]:
        return [1e3 * x for x in getattr(self.head, "stage_compute_s", [])]

    def microbatches(self) -> str:
        stats = self.head.stats
        return f"{self.head.num_microbatches} (max in flight {stats.max_microbatches_in_flight})"

    async def stop(self) -> None:
        if self.head is not None:
            self.head.begin_stop()


# ---- workloads ----------------------------------------------------------------------------


async def consume(head, prompt: list[int], params, trace: Trace) -> None:
    from molink.coordinator.pipeline_head import PipelineNotReady, StageUnavailable

    trace.submitted = time.perf_counter()
    count = 0
    try:
        async for out in head.generate(prompt, params):
            now = time.perf_counter()
            num = len(out.outputs[0].token_ids)
            trace.token_times.extend([now] * (num - count))
            count = num
            if out.finished:
                trace.finished = True
    except asyncio.CancelledError:
        raise
    except (PipelineNotReady, StageUnavailable, ValueError, RuntimeError) as exc:
        # a failed request is reported, not fatal to the benchmark
        trace.error = f"{type(exc).__name__}: {exc}"


async def warm_up(head, vocab: int) -> None:
    from molink import SamplingParams

    trace = Trace(4)
    await asyncio.wait_for(consume(head, list(range(FIRST_TOKEN_ID, FIRST_TOKEN_ID + 4)),
                                   SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                   trace), 120)
    if trace.error:
        raise RuntimeError(f"warm-up request failed: {trace.error}")


async def run_decode_heavy(pipe: Pipeline, result: RunResult, timing: Timing,
                           prompt_len: int) -> None:
    """N requests at once; measure a window once every request got its first token."""
    from molink import SamplingParams

    regime = pipe.regime
    rng = random.Random(1)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=min(
        4096, pipe.head.max_model_len - prompt_len - 1))
    traces = [Trace(prompt_len) for _ in range(regime.concurrency)]
    tasks = [asyncio.create_task(consume(
        pipe.head, [rng.randrange(FIRST_TOKEN_ID, regime.prompt_vocab) for _ in range(prompt_len)],
        params, trace)) for trace in traces]
    try:
        deadline = time.perf_counter() + timing.first_token_timeout_s
        while not all(t.token_times or t.error for t in traces):
            if time.perf_counter() > deadline:
                waiting = sum(not t.token_times for t in traces)
                raise TimeoutError(f"{waiting} requests had no first token after "
                                   f"{timing.first_token_timeout_s:.0f} s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(timing.settle_s)
        start, cpu0 = time.perf_counter(), pipe.cpu_snapshot()
        samples = [pipe.link_sample()]
        # At least the window, and long enough for every request to decode a few tokens in
        # it (a sequential round over 20 Mbit takes seconds), within a limit.
        while not window_done(traces, start, timing):
            await asyncio.sleep(0.1)
            samples.append(pipe.link_sample())
        end, cpu1 = time.perf_counter(), pipe.cpu_snapshot()
        result.library_hops = pipe.describe_hops()
        result.num_microbatches = pipe.microbatches()
        result.stage_step_ms = pipe.stage_step_ms()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    errors = [t.error for t in traces if t.error]
    if errors:
        result.notes.append(f"{len(errors)} requests failed, e.g. {errors[0]}")
    window = end - start
    in_window = [[x for x in t.token_times if start <= x < end] for t in traces]
    num_tokens = sum(len(times) for times in in_window)
    # Every request decodes through the whole window, so the pipeline's rate is the sum of
    # the requests' rates; unlike tokens / window it does not depend on where the window
    # cuts a round (with one micro-batch all N tokens of a round arrive at once).
    result.window_s = window
    result.throughput = sum((len(times) - 1) / (times[-1] - times[0])
                            for times in in_window if len(times) > 1 and times[-1] > times[0])
    result.notes.append(f"{result.system.label}: {window:.1f} s window, tokens in window / "
                        f"window = {num_tokens / window:.1f} tokens/s (vs sum of per-request "
                        f"rates {result.throughput:.1f})")
    result.num_requests = len(traces)
    result.ttft = percentiles([t.token_times[0] - t.submitted for t in traces if t.token_times])
    result.tpot = percentiles([(times[-1] - times[0]) / (len(times) - 1)
                               for times in in_window if len(times) > 1])
    result.itl = percentiles([b - a for times in in_window for a, b in itertools.pairwise(times)])
    middle = (start + end) / 2
    result.mean_context = prompt_len + sum(
        sum(x < middle for x in t.token_times) for t in traces) / len(traces)
    result.hop_bytes_per_token = bytes_per_token(samples, num_tokens)
    if regime.profile is not None and result.stage_step_ms:
        batch = -(-len(traces) // max(1, pipe.head.num_microbatches))
        predicted = [regime.step_s(r, batch, result.mean_context) * 1e3 for r in pipe.ranges]
        result.notes.append(
            f"{result.system.label}: emulated step at batch {batch}: profile predicts "
            + "/".join(f"{x:.0f}" for x in predicted) + " ms, stages took (head's EWMA) "
            + "/".join(f"{x:.0f}" for x in result.stage_step_ms) + " ms")
    result.cpu_percent = cpu_percent(cpu0, cpu1, window)


def window_done(traces: list[Trace], start: float, timing: Timing) -> bool:
    elapsed = time.perf_counter() - start
    if elapsed < timing.decode_window_s:
        return False
    if elapsed >= timing.decode_window_max_s:
        return True
    return all(len(t.token_times) - bisect.bisect_left(t.token_times, start) >= MIN_WINDOW_TOKENS
               for t in traces if not t.error)


def bytes_per_token(samples: list[tuple[list[int], list[int] | None]],
                    fallback_tokens: int) -> list[float]:
    """Per link: relay-counted bytes / tokens the library sent on it, between two samples
    (relay bytes, library tokens) taken while the link was idle, so that no message is half
    counted (with one micro-batch a round's bytes arrive in one burst); the window's ends
    when the link never idled. Without library token counts: ``fallback_tokens`` over the
    whole window."""
    per_link = []
    for j in range(len(samples[0][0])):
        first, last = samples[0], samples[-1]
        # Idle: neither bytes (the relay's count lags up to 50 ms) nor tokens (counted when
        # sent) moved between two samples 100 ms apart.
        idle = [k for k in range(1, len(samples))
                if samples[k][0][j] == samples[k - 1][0][j]
                and (samples[k][1] is None or samples[k][1][j] == samples[k - 1][1][j])]
        if first[1] is not None and len(idle) >= 2:
            a, b = samples[idle[0]], samples[idle[-1]]
            if b[1][j] > a[1][j]:
                first, last = a, b
        tokens = fallback_tokens
        if first[1] is not None and j < len(first[1]) and j < len(last[1]):
            tokens = last[1][j] - first[1][j] or fallback_tokens
        per_link.append((last[0][j] - first[0][j]) / tokens if tokens else 0.0)
    return per_link


def cpu_percent(before: dict, after: dict, window_s: float) -> dict[str, float]:
    """% of one core per component over the window; "other": processes not of this run."""
    used = {k: 100 * (after[k] - before[k]) / window_s for k in before}
    used["other"] = max(0.0, used.pop("machine") - sum(used.values()))
    return used


def mixed_lengths(num: int, output_cap: int, seed: int = 2) -> list[tuple[int, int]]:
    """ShareGPT-like (prompt, output) lengths: log-normal prompts (median 128, up to 1,000)
    except every tenth request (the 6th, 16th, ...), whose prompt is long (1,000-2,000);
    log-normal outputs (median 48)."""
    rng = random.Random(seed)
    lengths = []
    for i in range(num):
        if i % 10 == 5:
            prompt = rng.randint(1000, 2000)
        else:
            prompt = min(1000, max(4, round(rng.lognormvariate(math.log(128), 1.0))))
        output = min(output_cap, max(4, round(rng.lognormvariate(math.log(48), 0.8))))
        lengths.append((prompt, output))
    return lengths


def mixed_rate(regime: Regime, setting: Setting, output_cap: int, load: float) -> tuple[float, str]:
    """Arrivals/s offering ``load`` x the capacity of (b)'s scarcest resource for the tokens
    every request moves through every stage and link (prompt + output tokens)."""
    from molink.transport.link_emulator import LinkSpec

    sample = mixed_lengths(5000, output_cap, seed=99)
    mean_tokens = sum(p + o for p, o in sample) / len(sample)
    link = LinkSpec.parse(setting.link).bandwidth_bps / 8 / (regime.hidden_size * regime.element_bytes)
    ranges = split_layers(regime.num_layers, setting.num_stages)
    if regime.profile is not None:
        compute = min(regime.prefill_tokens_per_s(r, 2048) for r in ranges)
    else:  # the stages share the machine's cores
        compute = len(os.sched_getaffinity(0)) / sum(
            1 / regime.prefill_tokens_per_s(r, 2048) for r in ranges)
    capacity = min(link, compute)
    why = (f"{load:.0%} of min(uncompressed link {link:.0f}, prefill compute {compute:.0f}) "
           f"tokens/s / {mean_tokens:.0f} prompt+output tokens per request")
    return load * capacity / mean_tokens, why


async def run_mixed(pipe: Pipeline, result: RunResult, timing: Timing, rate: float) -> None:
    """Poisson arrivals for a while, then wait for every request to finish (bounded)."""
    from molink import SamplingParams

    regime = pipe.regime
    gaps = random.Random(3)
    arrivals = list(itertools.accumulate(gaps.expovariate(rate)
                                         for _ in range(timing.mixed_requests)))
    lengths = mixed_lengths(len(arrivals), timing.mixed_output_cap)
    tokens = random.Random(4)
    traces = [Trace(p) for p, _ in lengths]
    start = time.perf_counter()
    sample0, cpu0 = pipe.link_sample(), pipe.cpu_snapshot()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        prompt_len, output_len = lengths[i]
        prompt = [tokens.randrange(FIRST_TOKEN_ID, regime.prompt_vocab) for _ in range(prompt_len)]
        await consume(pipe.head, prompt, SamplingParams(temperature=0, ignore_eos=True,
                                                        max_tokens=output_len), traces[i])

    tasks = [asyncio.create_task(one(i)) for i in range(len(arrivals))]
    _, pending = await asyncio.wait(tasks, timeout=arrivals[-1] + timing.mixed_drain_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    end = max([x for t in traces for x in t.token_times[-1:]], default=time.perf_counter())
    sample1, cpu1 = pipe.link_sample(), pipe.cpu_snapshot()
    result.library_hops = pipe.describe_hops()
    result.num_microbatches = pipe.microbatches()
    result.stage_step_ms = pipe.stage_step_ms()
    errors = [t.error for t in traces if t.error]
    if errors:
        result.notes.append(f"{len(errors)} requests failed, e.g. {errors[0]}")
    done = [t for t in traces if t.finished]
    result.num_requests, result.num_unfinished = len(traces), len(traces) - len(done)
    result.window_s = end - start
    num_tokens = sum(len(t.token_times) for t in traces)
    result.throughput = num_tokens / result.window_s if result.window_s > 0 else 0.0
    result.ttft = percentiles([t.token_times[0] - t.submitted for t in traces if t.token_times])
    result.tpot = percentiles([(t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1)
                               for t in traces if len(t.token_times) > 1])
    result.e2e = percentiles([t.token_times[-1] - t.submitted for t in done])
    result.itl = percentiles([b - a for t in traces for a, b in itertools.pairwise(t.token_times)])
    moved = sum(t.prompt_len + len(t.token_times) for t in traces)
    result.hop_bytes_per_token = bytes_per_token([sample0, sample1], moved)
    result.cpu_percent = cpu_percent(cpu0, cpu1, result.window_s)


# ---- the bound ------------------------------------------------------------------------------


@dataclass
class Bound:
    terms: list[tuple[str, float, str]]  # (name, tokens/s, how it was obtained)
    round_trip_s: float  # one token round the pipeline at batch 1: also the TPOT floor

    @property
    def value(self) -> float:
        return min(v for _, v, _ in self.terms)

    @property
    def binding(self) -> str:
        return min(self.terms, key=lambda t: t[1])[0]


def compute_bound(regime: Regime, setting: Setting, decode_c: RunResult | None,
                  max_num_seqs: int) -> Bound:
    """The decode-heavy throughput bound of a setting (see the module docstring)."""
    from molink.transport.link_emulator import LinkSpec

    spec = LinkSpec.parse(setting.link)
    bandwidth = spec.bandwidth_bps / 8  # bytes/s
    ranges = split_layers(regime.num_layers, setting.num_stages)
    context = decode_c.mean_context if decode_c and decode_c.ok else regime.cpu_context or 64
    if regime.profile is None:
        context = regime.cpu_context
    max_batch = min(max_num_seqs, regime.concurrency)
    batches = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, max_batch})
    batches = [b for b in batches if b <= max_batch]
    terms = []
    for i, layers in enumerate(ranges):
        best = max(batches, key=lambda b: b / regime.step_s(layers, b, context))
        cap = best / regime.step_s(layers, best, context)
        how = (f"best batch {best}: {regime.step_s(layers, best, context) * 1e3:.1f} ms/step, "
               f"context {context:.0f}" + ("" if regime.profile else ", one core"))
        terms.append((f"stage {i + 1} (layers {layers[0]}:{layers[1]})", cap, how))
    if regime.profile is None:
        cores = len(os.sched_getaffinity(0))
        best = max(batches, key=lambda b: b / sum(regime.step_s(r, b, context) for r in ranges))
        total = sum(regime.step_s(r, best, context) for r in ranges)
        terms.append((f"machine ({cores} cores shared by all stages)", cores * best / total,
                      f"best batch {best}: all layers {total * 1e3:.1f} ms/step on one core"))
    measured = decode_c.hop_bytes_per_token if decode_c and decode_c.ok else []
    round_trip = sum(regime.step_s(r, 1, context) for r in ranges)
    for j in range(setting.num_stages):
        name = (f"link stage {j + 1} -> stage {j + 2}" if j + 1 < setting.num_stages
                else f"link stage {j + 1} -> head")
        if j < len(measured) and measured[j] > 0:
            per_token, how = measured[j], "bytes/token counted at the relay in (c)'s window"
        elif j + 1 < setting.num_stages:
            per_token, how = regime.hidden_size * regime.element_bytes, "hidden x dtype bytes"
        else:
            per_token, how = 16.0, "token id + framing (estimate)"
        terms.append((name, bandwidth / per_token, f"{per_token:.0f} B/token; {how}"))
        round_trip += spec.latency_s + per_token / bandwidth
    terms.append(("concurrency / round trip", regime.concurrency / round_trip,
                  (f"{regime.concurrency} requests / {round_trip * 1e3:.1f} ms (latencies "
                   "+ one token's transfer per link + every stage's step at batch 1)")))
    return Bound(terms, round_trip)


# ---- running a grid ---------------------------------------------------------------------------


def plan_jobs(args) -> list[Job]:
    """Quick: the target setting only. Full: see ``--full-grid`` for what is left out."""
    regimes = ["emulated", "cpu"] if args.regime == "both" else [args.regime]
    target = (TARGET_STAGES, TARGET_LINK)
    if args.quick:
        jobs = [Job(Setting("emulated", *target), SYSTEMS["a"], ("decode",)),
                Job(Setting("emulated", *target), SYSTEMS["b"], ("mixed",)),
                Job(Setting("emulated", *target), SYSTEMS["c"], ("decode", "mixed")),
                Job(Setting("cpu", *target), SYSTEMS["c"], ("decode",))]
        return [j for j in jobs if j.setting.regime in regimes
                and (not args.systems or j.system.key in args.systems)]
    jobs = []
    for regime in regimes:
        for num_stages in args.stages:
            for link in args.links:
                jobs += setting_jobs(Setting(regime, num_stages, link), args)
    return jobs


def setting_jobs(setting: Setting, args) -> list[Job]:
    """(a), (b), (c) everywhere, ablations at the target setting. Unless --full-grid (hours):
    mixed only at 3 stages over 1gbit and 100mbit (emulated) or at the target (CPU), CPU
    ablations decode-heavy only, and CPU only at 3 stages."""
    cpu = setting.regime == "cpu"
    if not args.full_grid and cpu and setting.num_stages != TARGET_STAGES:
        return []
    mixed_here = args.full_grid or setting.is_target or (
        not cpu and setting.num_stages == TARGET_STAGES and setting.link != "20mbit:50ms")
    workloads = tuple(w for w in args.workloads if w == "decode" or mixed_here)
    keys = list(MAIN_SYSTEMS)
    if setting.is_target and not args.no_ablations:
        keys += ABLATIONS
    if args.systems:
        keys = [k for k in keys if k in args.systems]
    jobs = []
    for key in keys:
        chosen = workloads
        if key in ABLATIONS and cpu and not args.full_grid:
            chosen = tuple(w for w in workloads if w == "decode")
        if chosen:
            jobs.append(Job(setting, SYSTEMS[key], chosen))
    return jobs


async def run_job(job: Job, regime: Regime, children: Children, timing: Timing, args,
                  results: list[RunResult]) -> None:
    setting, system = job.setting, job.system
    pipe = Pipeline(regime, setting, system, children, max_num_seqs=regime.concurrency)
    started = time.perf_counter()
    try:
        await pipe.start()
        await warm_up(pipe.head, regime.prompt_vocab)
        print(f"  {system.label}: pipeline ready in {time.perf_counter() - started:.1f} s",
              flush=True)
        for workload in job.workloads:
            result = RunResult(setting, system, workload, notes=list(pipe.notes))
            results.append(result)
            try:
                if workload == "decode":
                    await run_decode_heavy(pipe, result, timing, args.prompt_len)
                else:
                    rate, why = mixed_rate(regime, setting, timing.mixed_output_cap, args.load)
                    result.notes.append(f"arrivals {rate:.2f}/s ({why})")
                    await run_mixed(pipe, result, timing, rate)
            except (TimeoutError, RuntimeError) as exc:
                result.ok, result.error = False, str(exc)
            print(f"  {system.label:<52} {workload:<6} {describe(result)}", flush=True)
    except (TimeoutError, RuntimeError, OSError) as exc:
        failed = RunResult(setting, system, ",".join(job.workloads), ok=False, error=str(exc))
        results.append(failed)
        print(f"  {system.label}: pipeline failed: {exc}", flush=True)
    finally:
        await pipe.stop()
        await children.stop_all()
        if pipe.head is not None:
            await pipe.head.stop()
    print(f"    ({time.perf_counter() - started:.0f} s with start and stop; load average "
          f"{os.getloadavg()[0]:.1f})", flush=True)


def describe(r: RunResult) -> str:
    if not r.ok:
        return f"FAILED: {r.error}"
    text = f"{r.throughput:7.1f} tok/s"
    if r.ttft:
        text += f"  TTFT p50/p99 {r.ttft[0]:.2f}/{r.ttft[1]:.2f} s"
    if r.tpot:
        text += f"  TPOT p50/p99 {r.tpot[0] * 1e3:.0f}/{r.tpot[1] * 1e3:.0f} ms"
    if r.e2e:
        text += f"  e2e p50/p99 {r.e2e[0]:.1f}/{r.e2e[1]:.1f} s"
    if r.num_unfinished:
        text += f"  ({r.num_unfinished}/{r.num_requests} unfinished)"
    steps = "/".join(f"{x:.0f}" for x in r.stage_step_ms)
    return text + f"  micro-batches {r.num_microbatches}  steps {steps} ms"


async def run_all(args, timing: Timing) -> tuple[list[RunResult], dict[str, Regime]]:
    jobs = plan_jobs(args)
    print(f"{len(jobs)} pipelines to run", flush=True)
    results: list[RunResult] = []
    regimes: dict[str, Regime] = {}
    with tempfile.TemporaryDirectory(prefix="molink-weak-links-") as tmp:
        work = Path(tmp)
        children = Children(work)
        try:
            if any(j.setting.regime == "emulated" for j in jobs):
                regimes["emulated"] = emulated_regime(args.model, work, args.device_profile,
                                                      args.concurrency)
            if any(j.setting.regime == "cpu" for j in jobs):
                counts = sorted({j.setting.num_stages for j in jobs if j.setting.regime == "cpu"})
                regimes["cpu"] = cpu_regime(args, counts)
            current = None
            for job in jobs:
                if job.setting != current:
                    current = job.setting
                    print(f"\n== {current.name}", flush=True)
                await run_job(job, regimes[job.setting.regime], children, timing, args, results)
        finally:
            await children.stop_all()
    return results, regimes


# ---- reporting ------------------------------------------------------------------------------


def find(results: list[RunResult], setting: Setting, key: str, workload: str) -> RunResult | None:
    for r in results:
        if r.setting == setting and r.system.key == key and r.workload == workload and r.ok:
            return r
    return None


def bounds_of(results, regimes, args) -> dict[Setting, Bound]:
    bounds = {}
    for setting in dict.fromkeys(r.setting for r in results):
        bounds[setting] = compute_bound(regimes[setting.regime], setting,
                                        find(results, setting, "c", "decode"),
                                        regimes[setting.regime].concurrency)
    return bounds


def setting_section(setting: Setting, results: list[RunResult], bound: Bound) -> str:
    headline = (f"Bound (decode-heavy): **{bound.value:.0f} tokens/s**, set by "
                f"{bound.binding}. Terms:")
    lines = [f"### {setting.name}", "", headline, ""]
    lines += [f"- {name}: {value:.0f} tokens/s ({how})" for name, value, how in bound.terms]
    lines.append("")
    for workload, title in (("decode", "decode-heavy"), ("mixed", "mixed")):
        rows = [r for r in results if r.setting == setting and r.workload == workload]
        if not rows:
            continue
        if workload == "mixed":
            floor = (f"TPOT floor (one token round the pipeline at batch 1, as in the "
                     f"concurrency term): {bound.round_trip_s * 1e3:.0f} ms.")
            lines += [floor, ""]
        lines += [f"**{title}**", "", TABLE_HEADER, "|---|---:|---:|---|---|---|---|---|---|---|---|---|"]
        lines += [table_row(r, bound) for r in rows]
        notes = sorted({n for r in rows for n in r.notes})
        notes += [f"{r.system.label}, library hop stats (cumulative since start): " + "; ".join(r.library_hops)
                  for r in rows if r.library_hops]
        lines += [""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


TABLE_HEADER = ("| system | output tok/s | fraction of bound | TTFT p50 / p99 s | TPOT p50 / p99 ms "
                "| ITL p50 / p99 ms | e2e p50 / p99 s | requests (unfinished) | micro-batches | stage step ms (head's EWMA) "
                "| bytes/token per link | CPU % head / stages / relays / other |")


def table_row(r: RunResult, bound: Bound) -> str:
    if not r.ok:
        return f"| {r.system.label} | failed: {r.error.splitlines()[0][:120]} |||||||||||"

    def pair(p, scale=1.0, fmt="{:.2f}"):
        return "-" if p is None else f"{fmt.format(p[0] * scale)} / {fmt.format(p[1] * scale)}"

    fraction = f"{r.throughput / bound.value:.0%}" if r.workload == "decode" else "(load-set)"
    per_link = ", ".join(f"{b:.0f}" for b in r.hop_bytes_per_token)
    steps = ", ".join(f"{x:.1f}" for x in r.stage_step_ms)
    cpu = " / ".join(f"{r.cpu_percent.get(k, 0):.0f}"
                     for k in ("head", "stages", "relays", "other"))
    return (f"| {r.system.label} | {r.throughput:.1f} | {fraction} | {pair(r.ttft)} | "
            f"{pair(r.tpot, 1e3, '{:.0f}')} | {pair(r.itl, 1e3, '{:.0f}')} | {pair(r.e2e, 1.0, '{:.1f}')} | {r.num_requests} "
            f"({r.num_unfinished}) | {r.num_microbatches} | {steps} | {per_link} | {cpu} |")


def summary(results, bounds) -> dict:
    """The headline ratios (emulated and CPU at the target setting); None where not measured."""
    emulated = Setting("emulated", TARGET_STAGES, TARGET_LINK)
    cpu = Setting("cpu", TARGET_STAGES, TARGET_LINK)
    a, c = find(results, emulated, "a", "decode"), find(results, emulated, "c", "decode")
    b_mixed, c_mixed = find(results, emulated, "b", "mixed"), find(results, emulated, "c", "mixed")
    c_cpu = find(results, cpu, "c", "decode")

    def ratio(x, y):
        return round(x / y, 3) if x is not None and y else None

    out = {
        "throughput_vs_sequential": ratio(c and c.throughput, a and a.throughput),
        "tpot_p99_reduction_vs_fifo": (round(1 - c_mixed.tpot[1] / b_mixed.tpot[1], 3)
                                       if c_mixed and b_mixed and c_mixed.tpot and b_mixed.tpot
                                       else None),
        "fraction_of_bound": ratio(c and c.throughput, emulated in bounds
                                   and bounds[emulated].value),
        "cpu_fraction_of_bound": ratio(c_cpu and c_cpu.throughput,
                                       cpu in bounds and bounds[cpu].value),
        "ttft_p99_vs_fifo_mixed": ratio(c_mixed and c_mixed.ttft and c_mixed.ttft[1],
                                        b_mixed and b_mixed.ttft and b_mixed.ttft[1]),
        "emulated_bound_tokens_per_s": round(bounds[emulated].value, 1) if emulated in bounds
        else None,
        "emulated_c_tokens_per_s": round(c.throughput, 1) if c else None,
        "emulated_a_tokens_per_s": round(a.throughput, 1) if a else None,
    }
    out["targets_met"] = {
        "throughput_vs_sequential>=3": _at_least(out["throughput_vs_sequential"], 3.0),
        "fraction_of_bound>=0.8": _at_least(out["fraction_of_bound"], 0.8),
        "tpot_p99_reduction_vs_fifo>=0.5_and_ttft_p99_no_worse": (
            None if out["tpot_p99_reduction_vs_fifo"] is None or out["ttft_p99_vs_fifo_mixed"]
            is None else out["tpot_p99_reduction_vs_fifo"] >= 0.5
            and out["ttft_p99_vs_fifo_mixed"] <= 1.0),
        "cpu_fraction_of_bound>=0.7": _at_least(out["cpu_fraction_of_bound"], 0.7),
    }
    return out


def _at_least(value, threshold):
    return None if value is None else value >= threshold


def write_report(args, timing: Timing, results, regimes, bounds, headline, elapsed_s) -> str:
    import torch

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/weak_links.py",
                                                            *sys.argv[1:]])
    machine = (f"Machine: {len(os.sched_getaffinity(0))} cores (shared by the head, every stage "
               f"and every relay), torch {torch.__version__}, Python {sys.version.split()[0]}.")
    lines = ["# Weak links: sequential vs FIFO pipeline vs MoLink, against the bound", "",
             f"Command: `{command}` ({elapsed_s / 60:.1f} min)", "", machine, ""]
    for regime in regimes.values():
        lines.append(f"- **{regime.name}** model: {regime.description}; decode-heavy: "
                     f"{regime.concurrency} concurrent requests, {args.prompt_len}-token prompts.")
    lines += ["", METHOD.format(t=timing, min_tokens=MIN_WINDOW_TOKENS), "",
              "## Headline (emulated and CPU at 3 stages, 100 Mbit/20 ms)", "",
              "```json", json.dumps(headline, indent=2), "```", ""]
    for setting, bound in bounds.items():
        lines.append(setting_section(setting, results, bound))
    return "\n".join(lines) + "\n"


METHOD = """\
Systems: (a) one micro-batch at a time, FIFO sends, no compression; (b) micro-batches = stages,
FIFO, no chunking, no compression; (c) measured micro-batching, `molink` link schedule, `auto`
compression; ablations turn one of these off. Every pipeline is started fresh: a headless head
in the benchmark process, one `molink join` process per stage, one relay process per emulated
link (stage 1 shares the head's host: no link there).

Decode-heavy: the window starts {t.settle_s:.0f} s after every request got its first token and
lasts {t.decode_window_s:.0f} s, longer when needed for every request to get {min_tokens} tokens
in it (at most {t.decode_window_max_s:.0f} s); throughput = the sum over requests of (tokens in
the window - 1) / (time from its first to its last token in the window), which unlike tokens /
window does not depend on where the window cuts a round (the raw ratio is in the notes); TPOT
per request from its tokens in that window; TTFT from submission (all are submitted at once,
so it includes the initial prefill burst); e2e is not defined (requests are cut at the
window's end).

Mixed: {t.mixed_requests} requests with Poisson arrivals (same seeds, so the same requests
at the same times, for every system of a setting), prompts log-normal (median 128, up to
1,000) except every tenth, which is long (1,000-2,000 tokens), outputs log-normal (median 48,
up to {t.mixed_output_cap}); every request is waited for up to {t.mixed_drain_s:.0f} s after the
last arrival; throughput = output tokens / (last token - first arrival). ITL: gaps between
consecutive tokens of a request (a stall behind a prefill transfer shows there in full, while
TPOT spreads it over the request's tokens). The arrival rate offers half of (b)'s capacity
(uncompressed bytes per token on the link, the stages' prefill speed), so it does not saturate
(b) or (c): their throughput is set by the arrivals; (a), one resource busy at a time, may
fall behind (see unfinished).

Bytes/token per link: bytes counted at each relay (payload + protobuf + gRPC/HTTP2 framing)
divided by the tokens the library sent on that link (head.hop_stats()), between two moments
in the window when the link was idle (so no message is half counted); mixed: over the whole
run. The head learns a stage's token count only when a later result brings it back, so with
one or two large micro-batches in flight ((a), (b)) a round's burst can be counted on one
side and not yet on the other: their windowed figures can be off by a round's share (the
library's own cumulative figures are in the notes); with many micro-batches, as for (c) whose
figures set the bound's link terms, the error is a fraction of a percent. CPU %: of one core, over the window (head = this process, with the client; other =
processes that are not part of this run)."""


def write_plots(results, bounds, stem: str) -> list[Path]:
    """Per regime: decode-heavy tokens/s per setting and system (bound as a line), and mixed
    TPOT p99 where the mixed workload ran. Skipped when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG plots "
              "(pip install matplotlib to get them)", flush=True)
        return []
    written = []
    for regime in dict.fromkeys(s.regime for s in bounds):
        settings = [s for s in bounds if s.regime == regime]
        mixed = [s for s in settings if any(r.setting == s and r.workload == "mixed" and r.ok
                                            for r in results)]
        keys = list(dict.fromkeys(r.system.key for r in results if r.setting.regime == regime))
        fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.3 * len(settings)), 8))
        _bars(axes[0], settings, keys, lambda s, k: getattr(
            find(results, s, k, "decode"), "throughput", 0.0))
        for i, s in enumerate(settings):
            axes[0].hlines(bounds[s].value, i - 0.45, i + 0.45, colors="k",
                           label="bound" if i == 0 else None)
        top = max([bounds[s].value for s in settings] + [
            r.throughput for r in results if r.setting.regime == regime and r.workload == "decode"])
        axes[0].set_ylim(0, 1.4 * top)  # room for the legend above the bars
        axes[0].set_title(f"{regime}: decode-heavy output tokens/s")
        axes[0].legend(fontsize=6, ncol=2)

        def tpot_p99(s, k):
            r = find(results, s, k, "mixed")
            return r.tpot[1] * 1e3 if r and r.tpot else 0.0

        _bars(axes[1], mixed, keys, tpot_p99)
        axes[1].set_title(f"{regime}: mixed TPOT p99 ms")
        fig.tight_layout()
        path = RESULTS / f"{stem}_{regime}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _bars(ax, settings: list[Setting], keys: list[str], value) -> None:
    width = 0.9 / max(1, len(keys))
    for k_index, key in enumerate(keys):
        xs = [i - 0.45 + (k_index + 0.5) * width for i in range(len(settings))]
        ax.bar(xs, [value(s, key) for s in settings], width, label=SYSTEMS[key].label)
    ax.set_xticks(range(len(settings)), [f"{s.num_stages} stages\n{s.link}" for s in settings],
                  fontsize=7)


# ---- entry point ------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="emulated 3 stages 100mbit:20ms ((a) decode-heavy, (b) mixed, (c) "
                             "both) + CPU (c) decode-heavy; short windows; prints only")
    parser.add_argument("--regime", choices=["emulated", "cpu", "both"], default="both")
    parser.add_argument("--stages", type=int, nargs="+", default=list(STAGE_COUNTS))
    parser.add_argument("--links", nargs="+", default=list(LINKS))
    parser.add_argument("--workloads", nargs="+", choices=["decode", "mixed"],
                        default=["decode", "mixed"])
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=None,
                        help="only these systems (default: a b c, plus the ablations at the "
                             "target setting)")
    parser.add_argument("--full-grid", action="store_true",
                        help="every workload and ablation on every setting (hours); default: "
                             "mixed only at 3 stages over 1gbit/100mbit (emulated) and at the "
                             "target (CPU), CPU only at 3 stages")
    parser.add_argument("--model", default="qwen2.5-32b", choices=["qwen2.5-32b", "llama-2-70b"],
                        help="emulated model (config under benchmarks/configs/)")
    parser.add_argument("--device-profile", default="rtx3090",
                        help="emulated stages' profile: rtx3090 | rtx4090 | a100-80gb | "
                             "published | file.json")
    parser.add_argument("--concurrency", type=int, default=512,
                        help="decode-heavy requests, emulated regime")
    parser.add_argument("--cpu-concurrency", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16,
                        help="decode-heavy prompt tokens (short: the sequential system pushes "
                             "every prompt through every link one micro-batch at a time)")
    parser.add_argument("--load", type=float, default=0.5,
                        help="mixed: offered load as a fraction of (b)'s capacity")
    parser.add_argument("--cpu-hidden", type=int, default=1024)
    parser.add_argument("--cpu-layers", type=int, default=12)
    parser.add_argument("--cpu-vocab", type=int, default=2048)
    parser.add_argument("--cpu-kv-blocks", type=int, default=6144)
    parser.add_argument("--decode-window", type=float, default=None)
    parser.add_argument("--mixed-requests", type=int, default=None)
    args = parser.parse_args(argv)
    if args.concurrency < 128 or args.cpu_concurrency < 128:
        parser.error("decode-heavy needs at least 128 concurrent requests (issue #8)")
    return args


def validate(args) -> None:
    """Fail fast on options a pipeline would only reject minutes into the run."""
    from molink.runtime.device_profile import GPUS
    from molink.transport.link_emulator import LinkSpec

    for link in args.links:
        LinkSpec.parse(link)
    if args.device_profile not in GPUS and args.device_profile != "published" \
            and not Path(args.device_profile).is_file():
        raise ValueError(f"--device-profile {args.device_profile!r} is neither a GPU "
                         f"({', '.join(GPUS)}), 'published' nor a JSON file")
    if any(n < 2 for n in args.stages):
        raise ValueError("--stages: at least 2 (a link needs two ends)")


def is_default_grid(args) -> bool:
    """Whether the command ran the default grid (written to weak_links.md) or a subset."""
    return args == parse_args(["--full-grid"] if args.full_grid else [])


def make_timing(args) -> Timing:
    if args.quick:
        timing = Timing(decode_window_s=6, decode_window_max_s=30, settle_s=1,
                        first_token_timeout_s=90, mixed_requests=16, mixed_drain_s=30,
                        mixed_output_cap=64)
    else:
        timing = Timing(decode_window_s=8, decode_window_max_s=90, settle_s=1,
                        first_token_timeout_s=240, mixed_requests=32, mixed_drain_s=90,
                        mixed_output_cap=128)
    if args.decode_window:
        timing = dataclasses.replace(timing, decode_window_s=args.decode_window)
    if args.mixed_requests:
        timing = dataclasses.replace(timing, mixed_requests=args.mixed_requests)
    return timing


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--relay"]:
        if len(argv) != 6 or argv[4] != "--relay-stats":
            print("usage: weak_links.py --relay SPEC LISTEN_PORT HOST:PORT --relay-stats FILE",
                  file=sys.stderr)
            return 2
        return run_relay(argv[1], int(argv[2]), argv[3], argv[5])
    args = parse_args(argv)
    try:
        validate(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    timing = make_timing(args)
    started = time.perf_counter()
    results, regimes = asyncio.run(run_all(args, timing))
    bounds = bounds_of(results, regimes, args)
    headline = summary(results, bounds)
    elapsed = time.perf_counter() - started
    report = write_report(args, timing, results, regimes, bounds, headline, elapsed)
    print("\n## Headline" + report.split("## Headline", 1)[1], flush=True)
    if not args.quick:
        # A filtered run must not overwrite the default grid's results (40 minutes' worth).
        stem = "weak_links" if is_default_grid(args) else "weak_links_partial"
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{stem}.md").write_text(report)
        print(f"wrote {RESULTS / f'{stem}.md'}", flush=True)
        for path in write_plots(results, bounds, stem):
            print(f"wrote {path}", flush=True)
    print(f"total {elapsed:.0f} s", flush=True)
    print(json.dumps(headline), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
