"""DeviceProfile: how long a device takes for one step of some layers (for emulated stages).

A profile is JSON with piecewise-linear curves of *milliseconds per layer* against the
number of tokens in a step, one for decode and one for prefill, plus a cost per request
per 1,000 tokens of context (attention reading the KV cache)::

    {"name": "rtx3090", "source": "...",
     "decode_ms_per_layer": [[1, 0.15], [64, 0.19], [256, 0.40]],
     "prefill_ms_per_layer": [[16, 0.26], [1024, 1.7], [8192, 11.0]],
     "context_ms_per_layer_per_1k": 0.004}

Between points times are interpolated linearly; beyond the last point they grow in
proportion to tokens (the compute-bound regime). A roofline generator derives a profile
for a model from a GPU's memory bandwidth and peak FLOP/s; the profile measured by the
system MoLink re-implements ships for comparison with its regime.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bandwidth_gbps: float  # GB/s
    peak_tflops: float  # dense fp16/bf16 tensor-core TFLOP/s with fp32 accumulation
    step_overhead_ms_per_layer: float = 0.02  # kernel launches, norms, small ops


# Published datasheet figures.
GPUS = {
    "rtx3090": GpuSpec("rtx3090", 936.0, 71.0),
    "rtx4090": GpuSpec("rtx4090", 1008.0, 165.2),
    "a100-80gb": GpuSpec("a100-80gb", 2039.0, 312.0),
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

    def __post_init__(self) -> None:
        for label, curve in (("decode_ms_per_layer", self.decode_ms_per_layer),
                             ("prefill_ms_per_layer", self.prefill_ms_per_layer)):
            xs = [x for x, _ in curve]
            if not curve or xs != sorted(xs) or any(x <= 0 or y < 0 for x, y in curve):
                raise ValueError(f"{label} must be a non-empty list of [tokens > 0, ms >= 0] "
                                 "points with increasing tokens")

    def step_ms(self, num_layers: int, decode_tokens: int, prefill_tokens: int,
                context_tokens: int) -> float:
        """Predicted time of one step over ``num_layers`` layers."""
        per_layer = 0.0
        if decode_tokens:
            per_layer += _interpolate(self.decode_ms_per_layer, decode_tokens)
        if prefill_tokens:
            per_layer += _interpolate(self.prefill_ms_per_layer, prefill_tokens)
        per_layer += self.context_ms_per_layer_per_1k * context_tokens / 1000
        return per_layer * num_layers

    @classmethod
    def load(cls, source: str, arch=None) -> DeviceProfile:
        """``published``, a GPU name (a roofline for ``arch``, the model's ArchConfig) or a
        JSON file path."""
        if source == "published":
            return published_profile()
        if source in GPUS and arch is not None:
            return roofline(GPUS[source], arch.hidden_size, arch.intermediate_size,
                            arch.num_heads, arch.num_kv_heads, arch.head_dim)
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
                       context_ms_per_layer_per_1k=float(data.get("context_ms_per_layer_per_1k", 0)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"device profile is missing or has a malformed field: {exc}") from None

    def to_dict(self) -> dict:
        return {"name": self.name,
                "decode_ms_per_layer": [list(p) for p in self.decode_ms_per_layer],
                "prefill_ms_per_layer": [list(p) for p in self.prefill_ms_per_layer],
                "context_ms_per_layer_per_1k": self.context_ms_per_layer_per_1k}


def published_profile() -> DeviceProfile:
    layers = PUBLISHED["layers"]
    return DeviceProfile(
        "published",
        tuple((x, y / layers) for x, y in PUBLISHED["decode_ms"]),
        tuple((x, y / layers) for x, y in PUBLISHED["prefill_ms"]))


def roofline(gpu: GpuSpec, hidden_size: int, intermediate_size: int, num_heads: int,
             num_kv_heads: int, head_dim: int, bytes_per_param: int = 2) -> DeviceProfile:
    """Per-layer times from a roofline: max(bytes / bandwidth, flops / peak) + overhead."""
    params = (hidden_size * head_dim * (num_heads + 2 * num_kv_heads)  # q, k, v
              + num_heads * head_dim * hidden_size  # o
              + 3 * hidden_size * intermediate_size)  # gate, up, down
    weight_bytes = params * bytes_per_param
    kv_bytes_per_token = 2 * num_kv_heads * head_dim * bytes_per_param

    def ms(tokens: float) -> float:
        memory_s = weight_bytes / (gpu.memory_bandwidth_gbps * 1e9)
        compute_s = 2 * params * tokens / (gpu.peak_tflops * 1e12)
        return 1e3 * max(memory_s, compute_s) + gpu.step_overhead_ms_per_layer

    points = (1, 8, 32, 64, 128, 256, 512, 1024, 4096, 16384)
    curve = tuple((t, ms(t)) for t in points)
    context = 1e3 * kv_bytes_per_token * 1000 / (gpu.memory_bandwidth_gbps * 1e9)
    return DeviceProfile(f"{gpu.name}-roofline", curve, curve, context)


def _interpolate(curve, tokens: float) -> float:
    xs = [x for x, _ in curve]
    if tokens <= xs[0]:
        return curve[0][1]
    if tokens >= xs[-1]:
        return curve[-1][1] * tokens / xs[-1]
    i = bisect.bisect_right(xs, tokens)
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
