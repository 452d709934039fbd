"""Torch tensors <-> ``RawTensor`` (raw bytes + dtype + shape): the only way tensors cross.

``torch.frombuffer`` reinterprets bytes as numbers and cannot execute anything; no
object-deserializing loader is used anywhere on network input.

Activations may be compressed on the way (``to_raw(t, compression)``):

- ``float16`` / ``bfloat16``: a cast (halves float32; a no-op for a 16-bit model); a
  tensor beyond float16's range goes as bfloat16 instead of overflowing;
- ``int8``: per-token (per-row) absmax quantization: ``q = round(x / s)``, ``s = max|x| / 127``
  per row, sent as int8 plus one float32 scale per row (about half of 16-bit activations).
  Per-token scales keep a token with large activations from crushing the others.

``from_raw`` undoes any of them and returns the receiving stage's dtype.
"""

from __future__ import annotations

import torch

from molink.messages import WIRE_COMPRESSIONS, RawTensor

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64}
_NAMES = {dtype: name for name, dtype in _TORCH.items()}
_FLOAT16_MAX = 65504.0


def to_raw(tensor: torch.Tensor, compression: str = "none") -> RawTensor:
    tensor = tensor.detach()
    if compression == "int8" and tensor.dim() == 2 and tensor.is_floating_point():
        return _quantize_rows(tensor)
    if compression == "float16" and tensor.is_floating_point() and tensor.numel() and bool(
            tensor.abs().amax() > _FLOAT16_MAX):
        compression = "bfloat16"  # would overflow to inf: keep the range, lose precision
    if compression in ("float16", "bfloat16") and tensor.is_floating_point():
        tensor = tensor.to(_TORCH[compression])
    elif compression not in WIRE_COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(WIRE_COMPRESSIONS)}, "
                         f"got {compression!r}")
    return _plain(tensor)


def from_raw(raw: RawTensor, device: torch.device,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor ``raw`` carries, on ``device``; cast to ``dtype`` when given."""
    tensor = _tensor(raw.data, _TORCH[raw.dtype], raw.shape)
    if raw.row_scales:
        scales = _tensor(raw.row_scales, torch.float32, (raw.shape[0], 1))
        tensor = tensor.to(torch.float32) * scales
    if dtype is not None:
        tensor = tensor.to(dtype)
    return tensor.to(device)


def _plain(tensor: torch.Tensor) -> RawTensor:
    tensor = tensor.contiguous().cpu()
    return RawTensor(data=_bytes(tensor), dtype=_NAMES[tensor.dtype], shape=tuple(tensor.shape))


def _quantize_rows(tensor: torch.Tensor) -> RawTensor:
    values = tensor.to(torch.float32)
    scales = values.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    quantized = torch.round(values / scales).clamp_(-127, 127).to(torch.int8).contiguous().cpu()
    return RawTensor(data=_bytes(quantized), dtype="int8", shape=tuple(quantized.shape),
                     row_scales=_bytes(scales.reshape(-1).contiguous().cpu()))


def _bytes(tensor: torch.Tensor) -> bytes:
    # Reinterpret as bytes without going through numpy (which has no bfloat16).
    return tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def _tensor(data: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)
