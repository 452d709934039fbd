"""What a node offers for automatic placement: its memory and its measured speed.

Memory: ``--max-memory`` when given; on CUDA, ``utilization x total`` less what other
processes use now (``--gpu-memory-utilization``, default 0.9, as the KV budget reads it);
on a CPU, the memory the OS reports available. Speed: the time of one decode step through
one layer's worth of weights, measured on the device (decode reads every weight once per
step, so this is what a stage's step time scales with); an emulated device answers from
its profile. The head compares nodes by these numbers and gives faster nodes more layers.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass

import torch

from molink.runtime.device_profile import DeviceProfile
from molink.scheduler.placement import DEFAULT_HEADROOM

logger = logging.getLogger(__name__)

DEFAULT_GPU_UTILIZATION = 0.9
_TIMING_RUNS = 7
_MAX_PROBE_BYTES = 2 * 2**30  # a probe larger than this is scaled down (huge layers)


@dataclass(frozen=True)
class NodeOffer:
    memory_bytes: int
    seconds_per_layer: float


def human_bytes(num_bytes: float) -> str:
    """``12.0 GiB``, ``384.0 MiB``: the unit that keeps a digit before the point."""
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:.1f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB"


def offered_memory(device: torch.device, max_memory: int | None,
                   gpu_memory_utilization: float | None) -> int:
    """Bytes this node offers for weights and KV cache."""
    if max_memory is not None:
        return max_memory
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        utilization = gpu_memory_utilization or DEFAULT_GPU_UTILIZATION
        return max(0, int(utilization * total) - (total - free))
    return available_host_memory()


def available_host_memory() -> int:
    """Memory the OS could give this process now (Linux: MemAvailable; else physical / 2)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        except (ValueError, OSError):
            pass
    return 8 * 2**30  # nothing to read (Windows): a modest guess; give --max-memory


def measure_layer_seconds(layer_params: int, hidden_size: int, dtype: torch.dtype,
                          device: torch.device) -> float:
    """Median time of ``x @ W.T`` for one token, W holding one layer's parameters."""
    rows = max(1, layer_params // hidden_size)
    scale = 1.0
    if rows * hidden_size * dtype.itemsize > _MAX_PROBE_BYTES:
        scale = rows * hidden_size * dtype.itemsize / _MAX_PROBE_BYTES
        rows = int(rows / scale)
    weight = torch.randn(rows, hidden_size, device=device).to(dtype)
    x = torch.randn(1, hidden_size, device=device).to(dtype)
    times = []
    for _ in range(_TIMING_RUNS + 1):
        _synchronize(device)
        begin = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        _synchronize(device)
        times.append(time.perf_counter() - begin)
    del weight
    return statistics.median(times[1:]) * scale  # the first run warms up


def emulated_layer_seconds(profile: DeviceProfile, context_tokens: int) -> float:
    """An emulated device's time for one layer of a one-request decode step."""
    return profile.step_ms(1, 1, 0, context_tokens) / 1e3


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_offer(model: str, dtype: str, device: torch.device, max_memory: int | None,
                  gpu_memory_utilization: float | None) -> NodeOffer:
    """This node's offer for ``model`` (a local directory or GGUF file) in ``dtype``."""
    from molink.model.loader import holds_int4, load_config, resolve_dtype
    from molink.runtime.model_size import measure_model

    loaded = load_config(model)
    arch = loaded.arch
    torch_dtype = resolve_dtype(dtype, arch, device, holds_int4(loaded, None))  # as loaded
    sizes = measure_model(model, str(torch_dtype).removeprefix("torch."), None, 0,
                          device=device)
    layer_bytes = max(sizes.footprint.layer_weight_bytes)
    seconds = measure_layer_seconds(layer_bytes // torch_dtype.itemsize, arch.hidden_size,
                                    torch_dtype, device)
    return NodeOffer(offered_memory(device, max_memory, gpu_memory_utilization), seconds)


def kv_budget_within(memory_bytes: int, weight_bytes: int, what: str) -> int:
    """The KV cache a node offering ``memory_bytes`` has left after ``weight_bytes`` of
    weights, keeping the planner's headroom; ``what`` names the memory in the error."""
    budget = int(memory_bytes * (1 - DEFAULT_HEADROOM)) - weight_bytes
    if budget <= 0:
        raise ValueError(f"{what} ({memory_bytes / 2**30:.2f} GiB, less "
                         f"{DEFAULT_HEADROOM:.0%} headroom) leaves no room for a KV cache after "
                         f"{weight_bytes / 2**30:.2f} GiB of weights")
    return budget
