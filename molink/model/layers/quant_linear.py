"""QuantLinear: a linear layer whose weight stays in GGUF blocks, dequantized in forward.

The weight is one or more row parts (a fused projection: q | k | v, gate | up), each a
``[rows, row_bytes]`` uint8 buffer in its own GGUF type, since a Q4_K_M file stores v_proj
and down_proj as Q6_K next to Q4_K q/k. No kernel reads GGUF blocks: forward dequantizes
the parts and runs ``x @ W.T`` (16-bit activations on a CPU without native bf16: in float32),
which costs more than the product itself. So this is the fallback, for what no integer
kernel takes: on a CPU, linears whose parts an ``IntLinear`` kernel can multiply are loaded
as ``IntLinear`` instead (``gguf_weights``); Q6_K parts, float32 compute and GPUs stay here.
Buffers, not parameters, so ``next(model.parameters()).dtype`` stays the model's dtype.

``QuantEmbedding`` keeps a GGUF embedding table quantized too and dequantizes only the rows
looked up (rows are independent blocks).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.cpu_features import cpu_lacks_native_bf16
from molink.model.gguf_quants import dequantize, row_bytes
from molink.model.layers.cpu_linear import HALF_DTYPES


class QuantPart(NamedTuple):
    """One row range of a quantized weight."""

    ggml_type: int
    rows: int


class QuantLinear(nn.Module):
    """``y = x @ dequant(W).T + b``; W = parts stacked along the rows (output features)."""

    def __init__(self, in_features: int, parts: list[QuantPart], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(rows for _, rows in parts)
        self.part_types = [ggml_type for ggml_type, _ in parts]
        for i, (ggml_type, rows) in enumerate(parts):
            shape = (rows, row_bytes(ggml_type, in_features))
            self.register_buffer(f"part{i}", torch.empty(shape, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def raw_parts(self) -> list[torch.Tensor]:
        return [getattr(self, f"part{i}") for i in range(len(self.part_types))]

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """[out_features, in_features] dequantized."""
        parts = [dequantize(raw, ggml_type, self.in_features, dtype)
                 for raw, ggml_type in zip(self.raw_parts(), self.part_types)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if x.dtype in HALF_DTYPES and x.device.type == "cpu" and cpu_lacks_native_bf16():
            # 16-bit products crawl on such CPUs; the dequantized weight is float32 anyway
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight_as(torch.float32), bias).to(x.dtype)
        return F.linear(x, self.weight_as(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"types={self.part_types}")


class QuantEmbedding(nn.Module):
    """An embedding table kept as GGUF blocks; ``dtype``: what lookups return."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ggml_type: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.embedding_dim, self.ggml_type, self.dtype = embedding_dim, ggml_type, dtype
        shape = (num_embeddings, row_bytes(ggml_type, embedding_dim))
        self.register_buffer("part0", torch.empty(shape, dtype=torch.uint8))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.part0[input_ids.reshape(-1)]  # [T, row_bytes]
        values = dequantize(rows, self.ggml_type, self.embedding_dim, self.dtype)
        return values.reshape(*input_ids.shape, self.embedding_dim)  # [..., hidden]
