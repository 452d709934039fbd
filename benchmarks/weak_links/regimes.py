"""The two regimes: a model, how its stages run (emulated GPUs or real CPU), and their speed."""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.random_llama import build_model
from molink.scheduler.placement import split_layers

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "benchmarks" / "configs"
TOKENIZER_DIR = ROOT / "molink" / "assets" / "default_model"
BLOCK_SIZE = 16
FIRST_TOKEN_ID = 6  # prompts use ids >= 6: below are special tokens in both tokenizers


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
    quantization: str | None = None  # the stages' weights (emulated: the bytes they read)

    def step_s(self, layers: tuple[int, int], batch: int, context: float) -> float:
        """One decode step of ``batch`` requests with ``context`` tokens each (the last
        stage samples each one: its LM head counts)."""
        if self.profile is not None:
            sampled = batch if layers[1] == self.num_layers else 0
            return self.profile.step_ms(layers[1] - layers[0], batch, 0, batch * context,
                                        sampled) / 1e3
        return self.cpu_steps[layers].decode_s(batch)

    def prefill_tokens_per_s(self, layers: tuple[int, int], chunk: int) -> float:
        if self.profile is not None:
            return chunk / (self.profile.step_ms(layers[1] - layers[0], 0, chunk, 0) / 1e3)
        return self.cpu_steps[layers].prefill_tokens_per_s


def emulated_regime(config_name: str, work: Path, profile_name: str,
                    concurrency: int, quantization: str | None = None) -> Regime:
    """A model directory with the real config (vocab replaced) and the bundled tokenizer;
    the stages' profile as ``molink join --emulate-device`` builds it."""
    from molink.model.loader import load_config
    from molink.runtime.model_size import emulated_profile

    directory = work / f"emulated-{config_name}"
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((CONFIGS / f"{config_name}.json").read_text())
    tokenizer_vocab = json.loads((TOKENIZER_DIR / "config.json").read_text())["vocab_size"]
    # The real config, vocabulary included: the stages' LM head and embeddings take their
    # real time and memory. The head streams the stages' pseudo tokens through the bundled
    # tokenizer, which decodes ids past its own vocabulary as nothing: text is not measured.
    config.update(bos_token_id=0, eos_token_id=1)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, directory / name)
    arch = load_config(str(directory)).arch
    profile = emulated_profile(profile_name, str(directory), "bfloat16", quantization)
    weights = f"{quantization} weights" if quantization else "bfloat16 weights"
    return Regime("emulated", directory, "bfloat16", tokenizer_vocab, arch.hidden_size,
                  arch.num_layers, 2, concurrency, emulate=profile_name, profile=profile,
                  quantization=quantization, description=(
                      f"{config_name} (hidden {arch.hidden_size}, {arch.num_layers} layers, "
                      f"{arch.num_heads} heads, {arch.num_kv_heads} KV heads, intermediate "
                      f"{arch.intermediate_size}), {weights}, bfloat16 activations, stages "
                      f"emulate `{profile_name}` ({profile.name}), LM head of the real "
                      f"{arch.vocab_size:,}-token vocabulary on the last stage; prompts are "
                      f"ids of the bundled {tokenizer_vocab:,}-token tokenizer"))


def build_cpu_model(hidden: int, layers: int, vocab: int) -> Path:
    """A random-weight Llama, cached in the temp dir between runs (building takes a while)."""
    name = f"molink-weak-links-llama-h{hidden}-l{layers}-v{vocab}"
    directory = Path(tempfile.gettempdir()) / name
    if (directory / "complete").exists():
        return directory
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


def check_fits(regime: Regime, num_stages: int, kv_tokens: int) -> list[str]:
    """Each emulated stage's weights and a KV cache of ``kv_tokens`` tokens against its
    GPU's memory: one line per stage; a ValueError for the first that does not fit (a CPU
    regime or a profile without memory: nothing to check)."""
    from molink.runtime.device_profile import GPUS
    from molink.runtime.model_size import kv_blocks_that_fit, measure_model

    gpu = GPUS.get(regime.emulate or "")
    if gpu is None:
        return []
    model = measure_model(str(regime.model_dir), regime.dtype, None, 1, regime.quantization)
    needed = -(-kv_tokens // BLOCK_SIZE)
    lines = []
    for start, end in split_layers(regime.num_layers, num_stages):
        kv_blocks_that_fit(gpu, model, (start, end), BLOCK_SIZE, needed)  # raises if not
        weights = model.footprint.weight_bytes(start, end)
        kv = needed * BLOCK_SIZE * sum(model.footprint.layer_kv_bytes[start:end])
        lines.append(f"layers {start}:{end}: {weights / 2**30:.1f} GiB of weights + "
                     f"{kv / 2**30:.1f} GiB of KV cache for {kv_tokens:,} tokens, of "
                     f"{gpu.usable_bytes / 2**30:.1f} GiB usable on a {gpu.memory_gib:g} GiB "
                     f"{gpu.name}")
    return lines
