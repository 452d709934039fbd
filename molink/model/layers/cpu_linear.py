"""CpuLinear: linear layers computed the way a CPU is fast at, same weights, same math.

Two measured weaknesses of PyTorch's CPU matrix products (MKL on an AVX2 EPYC without
native bf16; ``benchmarks/results/cpu_linear.md``), both in the shapes serving hits most:

1. **A few rows** (2 to 64: a decode batch). ``x @ W.T`` runs up to ~3x slower than the
   same product taken as ``(W @ x.T).T`` (1024 x 2816, 4 rows: 4.5 vs 1.5 ms; 16 rows:
   6.8 vs 5.0 ms). One row (a GEMV) and many rows (a prefill) are as fast either way, so
   only 2..64 rows take the other orientation.
2. **16-bit weights on a CPU without 16-bit arithmetic** (x86 without AVX512-BF16 or AMX).
   A bf16 product converts on the fly: fine for a few rows, where the weight's bytes
   dominate (decode reads half of float32's), but a prefill runs ~3.5x slower than float32.
   From ``FLOAT32_FROM_TOKENS`` rows on, the weight is widened to float32 and the product
   runs in float32, then rounds back to the activation dtype. Widening goes into a scratch
   buffer kept per thread and reused (a fresh 11 MB tensor per call costs 4x the copy
   itself: new pages are zeroed), a block of rows at a time so the scratch stays small.

Both are exact reorderings of the same float32 products (results differ from ``F.linear``
only by summation order). It is an ``nn.Linear`` (same parameters, same checkpoint names);
``use_cpu_linears`` turns a model's plain linears into it in place.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

SMALL_BATCH_ROWS = (2, 64)  # the row counts computed as (W @ x.T).T
FLOAT32_FROM_TOKENS = 4  # 16-bit weights: measured crossover between 2 and 4 rows on AVX2
HALF_DTYPES = (torch.bfloat16, torch.float16)
SCRATCH_ELEMENTS = 1 << 22  # float32 scratch per thread and input width: 16 MB

_scratch = threading.local()


class CpuLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if weight.dtype == torch.float32 and x.dtype == torch.float32:
            if not SMALL_BATCH_ROWS[0] <= rows <= SMALL_BATCH_ROWS[1]:
                return F.linear(x, weight, self.bias)
            out = _small_batch(x.reshape(rows, -1), weight)
        elif weight.dtype in HALF_DTYPES and x.dtype in HALF_DTYPES and (
                rows >= FLOAT32_FROM_TOKENS):
            out = _widened(x.reshape(rows, -1).float(), weight)
        else:
            return F.linear(x, weight, self.bias)
        if self.bias is not None:
            out += self.bias.float()
        return out.to(x.dtype).view(*x.shape[:-1], -1)


def _small_batch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (float32, contiguous), in the orientation fast for its rows."""
    if SMALL_BATCH_ROWS[0] <= x.shape[0] <= SMALL_BATCH_ROWS[1]:
        return torch.mm(weight, x.T).T.contiguous()
    return F.linear(x, weight)


def _widened(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in float32 for a 16-bit ``weight``, widened block by block."""
    out_features, in_features = weight.shape
    block_rows = max(1, SCRATCH_ELEMENTS // max(1, in_features))
    scratch = _scratch_for(in_features, min(block_rows, out_features))
    if out_features <= block_rows:
        return _small_batch(x, scratch[:out_features].copy_(weight))
    out = torch.empty(x.shape[0], out_features)
    for start in range(0, out_features, block_rows):
        block = weight[start:start + block_rows]
        out[:, start:start + block.shape[0]] = _small_batch(
            x, scratch[:block.shape[0]].copy_(block))
    return out


def _scratch_for(in_features: int, rows: int) -> torch.Tensor:
    """This thread's float32 scratch of at least ``rows`` x ``in_features``."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(in_features)
    if buffer is None or buffer.shape[0] < rows:
        # a normal tensor even when first needed under inference mode, so that a later call
        # outside it may still write into it
        with torch.inference_mode(False):
            buffer = buffers[in_features] = torch.empty(rows, in_features)
    return buffer


def use_cpu_linears(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a ``CpuLinear``; how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = CpuLinear
            count += 1
    return count
