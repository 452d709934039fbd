"""KV cache memory of one stage: one tensor per attention layer, same block ids as the head.

Block ids are global (the head's scheduler owns the block tables); block *memory* is
local: each stage holds ``num_blocks`` blocks for its own layers only.
"""

from __future__ import annotations

import logging
import os

import torch

from molink.model.layers.attention import PagedAttention

logger = logging.getLogger(__name__)

_CPU_DEFAULT_BYTES = 2 * 1024**3  # at most this much RAM for KV on CPU by default ...
_CPU_MAX_FRACTION = 0.2  # ... and never more than this share of physical memory
_GPU_MEMORY_FRACTION = 0.9  # of the memory still free after the weights are loaded


def bytes_per_block(layers: list[PagedAttention], block_size: int, dtype: torch.dtype) -> int:
    per_token = sum(2 * layer.num_kv_heads * layer.head_dim for layer in layers)
    return per_token * block_size * torch.finfo(dtype).bits // 8


def default_kv_budget_bytes(device: torch.device, gpu_memory_utilization: float | None = None) -> int:
    """How much memory the KV cache may take when the user did not give a size: on CUDA,
    what keeps the device within ``gpu_memory_utilization`` of its total (call it once the
    weights are loaded), else 90 % of what is free."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if gpu_memory_utilization is not None:
            return max(1, int(gpu_memory_utilization * total) - (total - free))
        return int(free * _GPU_MEMORY_FRACTION)
    if gpu_memory_utilization is not None:
        logger.warning("gpu_memory_utilization applies to CUDA devices; ignored on %s",
                       device.type)
    physical = _physical_memory_bytes()
    if physical <= 0:
        return _CPU_DEFAULT_BYTES
    return int(min(_CPU_DEFAULT_BYTES, physical * _CPU_MAX_FRACTION))


def _physical_memory_bytes() -> int:
    """This machine's RAM (0: unknown). ``os.sysconf`` is POSIX only (absent on Windows), and
    a platform may lack one of its names (ValueError)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def num_blocks_for_budget(layers: list[PagedAttention], block_size: int, dtype: torch.dtype,
                          budget_bytes: int) -> int:
    per_block = bytes_per_block(layers, block_size, dtype)
    num_blocks = budget_bytes // per_block if per_block else 1
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory_bytes={budget_bytes} cannot hold a single KV block "
            f"({per_block} bytes at block_size={block_size})"
        )
    return int(num_blocks)


def allocate_kv_cache(layers: list[PagedAttention], num_blocks: int, block_size: int,
                      dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Allocate and bind one ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` per layer."""
    caches = []
    for layer in layers:
        cache = torch.zeros(2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim,
                            dtype=dtype, device=device)
        layer.kv_cache = cache
        caches.append(cache)
    total = sum(cache.numel() * cache.element_size() for cache in caches)
    logger.info("KV cache: %d blocks of %d tokens, %.1f MiB", num_blocks, block_size, total / 2**20)
    return caches
