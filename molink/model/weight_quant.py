"""Weight-only quantization at load time (``quantization="int8" | "int4"``), one tensor at a time.

int8: per output channel, symmetric: ``W ~ q * s``, ``q`` in -128..127, ``s = max|w| / 127``.
int4: groups of ``INT4_GROUP_SIZE`` (128) inputs, asymmetric (min/max)::

    s = (max - min) / 15        zero = min + 8 * s        W ~ q * s + zero,  q in -8..7

which is the layout of PyTorch's int4 CPU kernel (``IntLinear``). Group 128: the size AWQ and
GPTQ checkpoints and torchao default to; it keeps scale + zero overhead at 1/16 of the codes
in bf16 (a 4-bit stage at ~0.27x its bf16 size, ~0.28x even with fp32 scales), where 32 would
cost 4x that for a small accuracy gain. Inputs not a multiple of 128 use 64 or 32.

Scale and zero are rounded to the model dtype first, and the codes computed from the rounded
values, so the stored integers and scales are exactly what the layer multiplies by.
"""

from __future__ import annotations

import torch

from molink.config import QUANTIZATIONS
from molink.model.layers.int_linear import IntWeight

__all__ = ["QUANTIZATIONS", "can_quantize", "quantize"]
INT4_GROUP_SIZE = 128
INT4_GROUP_SIZES = (INT4_GROUP_SIZE, 64, 32)


def int4_group_size(in_features: int) -> int | None:
    """The group size used for a layer with ``in_features`` inputs (None: too narrow)."""
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def can_quantize(method: str, in_features: int) -> bool:
    return method == "int8" or int4_group_size(in_features) is not None


def quantize(weight: torch.Tensor, method: str, dtype: torch.dtype) -> IntWeight:
    """[out, in] full-precision weight -> its ``IntWeight`` (scales in ``dtype``)."""
    if method == "int8":
        return quantize_int8(weight, dtype)
    group_size = int4_group_size(weight.shape[1])
    assert group_size is not None, "callers check can_quantize first"
    return quantize_int4(weight, dtype, group_size)


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> IntWeight:
    w = weight.float()  # [out, in]
    scales = _representable(w.abs().amax(dim=1) / 127, dtype)  # [out]
    codes = torch.round(w / scales.unsqueeze(1)).clamp(-128, 127).to(torch.int8)
    return IntWeight(codes, scales.unsqueeze(0), None, w.shape[1], 8)


def quantize_int4(weight: torch.Tensor, dtype: torch.dtype, group_size: int) -> IntWeight:
    rows, cols = weight.shape
    w = weight.float().view(rows, cols // group_size, group_size)  # [out, groups, group]
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # [out, groups]
    scales = _representable((high - low) / 15, dtype)
    zeros = (low + 8 * scales).to(dtype).float()
    codes = torch.round((w - zeros.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(-8, 7)
    return IntWeight(codes.to(torch.int8).view(rows, cols), scales.t().contiguous(),
                     zeros.t().contiguous(), group_size, 4)


def _representable(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive scales rounded to ``dtype`` (a constant group gets the smallest normal).

    float32 scales keep 20 significant bits, so ``code * scale`` is exact in float32: the
    int4 kernel (which may fuse the multiply-add) and a plain reconstruction then agree bit
    for bit; bf16 / fp16 scales have fewer bits already.
    """
    scales = scales.clamp_min(torch.finfo(dtype).smallest_normal).to(dtype).float()
    if dtype != torch.float32:
        return scales
    mantissa, exponent = torch.frexp(scales)  # mantissa in [0.5, 1)
    return torch.ldexp(torch.round(mantissa * 2.0 ** 20) / 2.0 ** 20, exponent)
