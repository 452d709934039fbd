"""RMSNorm, computed in float32 exactly as Hugging Face does, and its variants."""

from __future__ import annotations

import torch
from torch import nn

from molink.model.layers.cpu_linear import HALF_DTYPES


class RMSNorm(nn.Module):
    # fused16's kernels where this norm runs through them (decoder.use_cpu_operators)
    kernel = None

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., hidden_size]; normalise in fp32, scale in the input dtype (HF order).
        if (self.kernel is not None and x.dtype == self.weight.dtype and x.dtype in HALF_DTYPES
                and x.stride(-1) == 1 and x.shape[-1] % 8 == 0):
            return self.kernel.rms_norm(x, self.weight, self.eps)  # same order, one call
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


class Fp32WeightRMSNorm(RMSNorm):
    """Normalise and scale by the weight in float32, cast once (ChatGLM, gpt-oss); differs
    from ``RMSNorm`` only below float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)
