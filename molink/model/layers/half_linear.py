"""16-bit weights on a CPU without 16-bit arithmetic: decode reads 16 bits, prefill computes
in float32.

On x86 CPUs without AVX512-BF16 or AMX, PyTorch's bf16 matrix products convert on the fly:
a decode step (a few tokens: memory-bound) still gains from reading half the bytes of
float32, but a prefill (many tokens: compute-bound) runs several times slower than float32
(measured on an AVX2 EPYC, 1024 x 4096: 1 token 0.9 ms bf16 vs 1.5 ms fp32; 128 tokens
99 ms bf16 vs 22 ms fp32). ``HalfWeightLinear`` keeps the 16-bit weight and picks per call:
up to ``FLOAT32_FROM_TOKENS - 1`` rows, the 16-bit product; from there on, the weight is
widened to float32 for that call (a transient copy, one layer at a time) and the product
runs in float32, then rounds back to the activation dtype: 128 tokens in 24 ms.

Measured on the 151M-parameter Llama against float32 weights (``benchmarks/results/
cpu_dtypes.md``): prefill 0.96x the time, one stream's decode 0.72x, 16 requests at once
0.89x the tokens/s (widening a weight for each product of 8+ rows costs more than reading
it in float32: a fused widening kernel is what is missing), at half the memory.

It is an ``nn.Linear`` (same parameters, same checkpoint names); ``use_float32_prefill``
turns a model's plain linears into it in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FLOAT32_FROM_TOKENS = 8  # measured crossover between 4 and 16 rows on AVX2
HALF_DTYPES = (torch.bfloat16, torch.float16)


class HalfWeightLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows < FLOAT32_FROM_TOKENS or x.dtype not in HALF_DTYPES:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def use_float32_prefill(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a ``HalfWeightLinear``; how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = HalfWeightLinear
            count += 1
    return count
