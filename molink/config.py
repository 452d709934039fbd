"""Frozen user-facing configuration, validated once at the edge.

Every invalid value raises ``ValueError`` naming the field. Runtime-derived values (the
number of KV blocks actually allocated, the resolved model length) make new objects with
``dataclasses.replace``; nothing here is mutated after construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8", "int4")  # weight-only, applied while a full-precision model loads
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16"}


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits of the head's scheduler."""

    max_num_seqs: int = 256  # requests in one step
    max_num_batched_tokens: int = 2048  # tokens in one step (prefill chunks are cut to fit)
    max_model_len: int = 4096  # prompt + output tokens of one request
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_model_len", self.max_model_len)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len when chunked prefill is off "
                f"(got {self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry."""

    block_size: int = 16  # tokens per block
    num_blocks: int | None = None  # None: sized from kv_cache_memory_bytes
    kv_cache_memory_bytes: int | None = None  # None: a device-dependent default
    # CUDA: the KV cache takes what keeps the device's use within this fraction of its total
    # once the weights are loaded (vLLM's option); None or a CPU: the default budget.
    gpu_memory_utilization: float | None = None

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        utilization = self.gpu_memory_utilization
        if utilization is not None and (isinstance(utilization, bool) or not isinstance(
                utilization, (int, float)) or not 0 < utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], "
                             f"got {utilization!r}")
        if self.block_size > 1024:
            raise ValueError(f"block_size must be <= 1024, got {self.block_size}")
        if self.num_blocks is not None:
            _positive("num_blocks", self.num_blocks)
        if self.kv_cache_memory_bytes is not None:
            _positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes)


@dataclass(frozen=True)
class ModelConfig:
    """Which model, which part of it, in which precision, on which device."""

    model: str
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    start_layer: int = 0
    end_layer: int | None = None  # None: to the last layer
    max_model_len: int | None = None  # None: from the model's config
    seed: int = 0
    tokenizer: str | None = None  # None: same directory as the model
    quantization: str | None = None  # None | int8 | int4 (AWQ/GPTQ/GGUF models need none)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty path")
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a device name such as 'cpu', got {self.device!r}")
        if not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise ValueError(f"start_layer must be a non-negative integer, got {self.start_layer!r}")
        if self.end_layer is not None and (
            not isinstance(self.end_layer, int) or self.end_layer <= self.start_layer
        ):
            raise ValueError(
                f"end_layer must be greater than start_layer ({self.start_layer}), "
                f"got {self.end_layer!r}"
            )
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, "
                             f"got {self.quantization!r}")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def parse_layer_range(text: str) -> tuple[int, int | None]:
    """Parse ``START:END`` (half-open; ``START:`` means to the last layer)."""
    if not isinstance(text, str) or text.count(":") != 1:
        raise ValueError(f"layers must look like START:END or START:, got {text!r}")
    start_text, end_text = text.split(":")
    try:
        start = int(start_text) if start_text.strip() else 0
        end = int(end_text) if end_text.strip() else None
    except ValueError:
        raise ValueError(f"layers must hold integers, got {text!r}") from None
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"layers must be a non-empty half-open range START:END, got {text!r}")
    return start, end


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
