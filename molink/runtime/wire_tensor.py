"""Torch tensors <-> ``RawTensor`` (raw bytes + dtype + shape): the only way tensors cross.

``torch.frombuffer`` reinterprets bytes as numbers and cannot execute anything; no
object-deserializing loader is used anywhere on network input.
"""

from __future__ import annotations

import torch

from molink.messages import RawTensor

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64}
_NAMES = {dtype: name for name, dtype in _TORCH.items()}


def to_raw(tensor: torch.Tensor) -> RawTensor:
    tensor = tensor.detach().contiguous().cpu()
    # Reinterpret as bytes without going through numpy (which has no bfloat16).
    data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return RawTensor(data=data, dtype=_NAMES[tensor.dtype], shape=tuple(tensor.shape))


def from_raw(raw: RawTensor, device: torch.device) -> torch.Tensor:
    dtype = _TORCH[raw.dtype]
    if not raw.data:
        return torch.empty(raw.shape, dtype=dtype, device=device)
    flat = torch.frombuffer(bytearray(raw.data), dtype=dtype)
    return flat.view(raw.shape).to(device)
