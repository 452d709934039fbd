"""DeviceProfile: how long a device takes for one step of some layers (for emulated stages).

A profile is JSON with piecewise-linear curves of *milliseconds per layer* against the
number of tokens in a step, one for decode and one for prefill, plus a cost per request
per 1,000 tokens of context (attention reading the KV cache) and, for the last stage, the
LM head's time against the tokens sampled in a step::

    {"name": "rtx3090", "source": "...",
     "decode_ms_per_layer": [[1, 0.15], [64, 0.19], [256, 0.40]],
     "prefill_ms_per_layer": [[16, 0.26], [1024, 1.7], [8192, 11.0]],
     "context_ms_per_layer_per_1k": 0.004,
     "lm_head_ms": [[1, 2.0], [512, 4.1]]}

Between points times are interpolated linearly; beyond the last point they grow in
proportion to tokens (the compute-bound regime). A step that mixes decode and prefill
tokens reads each weight once: it costs the prefill curve at all its tokens, never the sum
of two curves (each of which includes the weight read).

A roofline generator derives a profile for a model from a GPU's memory bandwidth and peak
FLOP/s *as achieved*: each ``GpuSpec`` carries the fraction of its datasheet bandwidth and
compute that measured step times reach and a per-layer launch overhead, fitted to the
published measurements it cites, and its memory (``model_size.kv_blocks_that_fit``
refuses a stage whose weights and KV cache would not fit). The profile measured by the system MoLink re-implements ships
for comparison with its regime.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bandwidth_gbps: float  # GB/s, datasheet
    peak_tflops: float  # dense fp16/bf16 tensor-core TFLOP/s with fp32 accumulation, datasheet
    step_overhead_ms_per_layer: float = 0.02  # kernel launches, norms, small ops
    memory_gib: float = 0.0  # device memory (0: unknown, nothing is refused)
    bandwidth_efficiency: float = 1.0  # achieved / datasheet bandwidth in a decode step
    compute_efficiency: float = 1.0  # achieved / datasheet FLOP/s in a long prefill
    source: str = ""  # where the efficiencies come from

    @property
    def usable_bytes(self) -> float:
        """What weights and KV cache may take: the memory less what the CUDA context,
        activations and the allocator keep (vLLM's default --gpu-memory-utilization)."""
        return self.memory_gib * 2**30 * USABLE_MEMORY_FRACTION


USABLE_MEMORY_FRACTION = 0.9

# Fitted to llama.cpp's RTX 3090 measurements in ggml-org/llama.cpp PR #4766 (master
# column, llama 7B, one GPU): F16 (12.55 GiB) tg128 48.52 t/s = 20.61 ms per token and Q4_0
# (3.56 GiB) 121.82 t/s = 8.21 ms; the two give 779 GB/s achieved (0.83 of 936) plus 3.3 ms
# per step over 32 layers (0.10 ms per layer). F16 pp512 4184.85 t/s: 512 tokens in 122 ms,
# less that overhead, is 58.6 TFLOP/s (2 x 6.74e9 x 512 plus attention): 0.82 of 71.
_RTX3090_FIT = {"bandwidth_efficiency": 0.83, "compute_efficiency": 0.82,
                "step_overhead_ms_per_layer": 0.10}
_SOURCE = "llama.cpp PR #4766, RTX 3090, llama 7B F16/Q4_0 tg128 and pp512"

# Datasheet figures; the achieved fractions are the RTX 3090's (the same kernels on the
# other GPUs: measured step times for them are not fitted here, so treat them as estimates).
GPUS = {
    "rtx3090": GpuSpec("rtx3090", 936.0, 71.0, memory_gib=24, source=_SOURCE, **_RTX3090_FIT),
    "rtx4090": GpuSpec("rtx4090", 1008.0, 165.2, memory_gib=24,
                       source=_SOURCE + " (assumed for this GPU)", **_RTX3090_FIT),
    "a100-80gb": GpuSpec("a100-80gb", 2039.0, 312.0, memory_gib=80,
                         source=_SOURCE + " (assumed for this GPU)", **_RTX3090_FIT),
}

# The measured profile the original system published (whole-model step times on its
# reference stage); ``layers`` is how many layers those measurements covered.
PUBLISHED = {
    "layers": 1,
    "decode_ms": [[1, 12.0], [17, 15.7], [50, 16.3], [100, 19.1], [150, 27.3], [200, 32.7]],
    "prefill_ms": [[10, 20.8], [1000, 136.0], [5000, 670.0]],
}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    decode_ms_per_layer: tuple[tuple[float, float], ...]
    prefill_ms_per_layer: tuple[tuple[float, float], ...]
    context_ms_per_layer_per_1k: float = 0.0
    lm_head_ms: tuple[tuple[float, float], ...] = ()  # against sampled tokens; () = none

    def __post_init__(self) -> None:
        for label, curve in (("decode_ms_per_layer", self.decode_ms_per_layer),
                             ("prefill_ms_per_layer", self.prefill_ms_per_layer),
                             ("lm_head_ms", self.lm_head_ms or ((1, 0),))):
            xs = [x for x, _ in curve]
            if not curve or xs != sorted(xs) or any(x <= 0 or y < 0 for x, y in curve):
                raise ValueError(f"{label} must be a non-empty list of [tokens > 0, ms >= 0] "
                                 "points with increasing tokens")

    def step_ms(self, num_layers: int, decode_tokens: int, prefill_tokens: int,
                context_tokens: int, sampled_tokens: int = 0) -> float:
        """Predicted time of one step over ``num_layers`` layers (plus the LM head for
        ``sampled_tokens`` on the last stage). Weights are read once per step: a mixed step
        costs the prefill curve at all its tokens."""
        tokens = decode_tokens + prefill_tokens
        per_layer = 0.0
        if tokens:
            curve = self.prefill_ms_per_layer if prefill_tokens else self.decode_ms_per_layer
            per_layer = _interpolate(curve, tokens)
        per_layer += self.context_ms_per_layer_per_1k * context_tokens / 1000
        head = _interpolate(self.lm_head_ms, sampled_tokens) if (
            sampled_tokens and self.lm_head_ms) else 0.0
        return per_layer * num_layers + head

    @classmethod
    def load(cls, source: str) -> DeviceProfile:
        """``published`` or a JSON file path (a GPU name is a roofline for a model:
        ``model_size.emulated_profile``)."""
        if source == "published":
            return published_profile()
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"device profile {source!r} is neither 'published' nor a JSON file "
                             f"(roofline profiles: {', '.join(GPUS)})")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, data: dict) -> DeviceProfile:
        try:
            return cls(name=str(data.get("name", "custom")),
                       decode_ms_per_layer=tuple(map(tuple, data["decode_ms_per_layer"])),
                       prefill_ms_per_layer=tuple(map(tuple, data["prefill_ms_per_layer"])),
                       context_ms_per_layer_per_1k=float(data.get("context_ms_per_layer_per_1k", 0)),
                       lm_head_ms=tuple(map(tuple, data.get("lm_head_ms", ()))))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"device profile is missing or has a malformed field: {exc}") from None

    def to_dict(self) -> dict:
        return {"name": self.name,
                "decode_ms_per_layer": [list(p) for p in self.decode_ms_per_layer],
                "prefill_ms_per_layer": [list(p) for p in self.prefill_ms_per_layer],
                "context_ms_per_layer_per_1k": self.context_ms_per_layer_per_1k,
                "lm_head_ms": [list(p) for p in self.lm_head_ms]}


def published_profile() -> DeviceProfile:
    layers = PUBLISHED["layers"]
    return DeviceProfile(
        "published",
        tuple((x, y / layers) for x, y in PUBLISHED["decode_ms"]),
        tuple((x, y / layers) for x, y in PUBLISHED["prefill_ms"]))


_POINTS = (1, 8, 32, 64, 128, 256, 512, 1024, 4096, 16384)


def roofline(gpu: GpuSpec, hidden_size: int, intermediate_size: int, num_heads: int,
             num_kv_heads: int, head_dim: int, bytes_per_param: float = 2,
             lm_head_params: int = 0, lm_head_bytes: float = 0) -> DeviceProfile:
    """Per-layer times from a roofline at the achieved bandwidth and FLOP/s:
    max(bytes / bandwidth, flops / compute) + overhead; the LM head (``lm_head_params``
    stored in ``lm_head_bytes``) likewise against the tokens sampled."""
    params = (hidden_size * head_dim * (num_heads + 2 * num_kv_heads)  # q, k, v
              + num_heads * head_dim * hidden_size  # o
              + 3 * hidden_size * intermediate_size)  # gate, up, down
    bandwidth = gpu.memory_bandwidth_gbps * 1e9 * gpu.bandwidth_efficiency  # bytes/s
    flops = gpu.peak_tflops * 1e12 * gpu.compute_efficiency

    def ms(num_params: int, num_bytes: float, tokens: float) -> float:
        return 1e3 * max(num_bytes / bandwidth, 2 * num_params * tokens / flops)

    curve = tuple((t, ms(params, params * bytes_per_param, t) + gpu.step_overhead_ms_per_layer)
                  for t in _POINTS)
    head = tuple((t, ms(lm_head_params, lm_head_bytes, t)) for t in _POINTS) if (
        lm_head_params) else ()
    kv_bytes_per_token = 2 * num_kv_heads * head_dim * bytes_per_param
    context = 1e3 * kv_bytes_per_token * 1000 / bandwidth
    return DeviceProfile(f"{gpu.name}-roofline", curve, curve, context, head)


def _interpolate(curve, tokens: float) -> float:
    xs = [x for x, _ in curve]
    if tokens <= xs[0]:
        return curve[0][1]
    if tokens >= xs[-1]:
        return curve[-1][1] * tokens / xs[-1]
    i = bisect.bisect_right(xs, tokens)
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
