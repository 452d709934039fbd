"""Cohere Command-R (``CohereForCausalLM``): parallel block, bias-free LayerNorm, logit scale.

* attention and MLP read the same normed input and both add to the residual (``PARALLEL``);
* LayerNorm without bias, in float32; the optional q/k norm is the same LayerNorm with one
  weight row per head (``[num_heads, head_dim]`` in the checkpoint);
* RoPE rotates interleaved pairs (rotate-every-two), in float32;
* logits are multiplied by ``logit_scale``; embeddings are tied by default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from molink.model.arch_config import ArchConfig, FamilyOptions
from molink.model.layers.decoder import PARALLEL, DecoderLM, DecoderParts


class CohereLayerNorm(nn.Module):
    """LayerNorm over the last dim without bias; ``shape`` may be (num_heads, head_dim)."""

    def __init__(self, shape: int | tuple[int, ...], eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., shape]; statistics over the last dim only, in float32.
        input_dtype = x.dtype
        x32 = x.float()
        mean = x32.mean(-1, keepdim=True)
        variance = (x32 - mean).pow(2).mean(-1, keepdim=True)
        x32 = (x32 - mean) * torch.rsqrt(variance + self.eps)
        return (self.weight.float() * x32).to(input_dtype)


@dataclass(frozen=True)
class CohereOptions(FamilyOptions):
    layer_norm_eps: float
    logit_scale: float


class CohereForCausalLM(DecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        logit_scale = getattr(hf, "logit_scale", None)
        options = CohereOptions(layer_norm_eps=hf.layer_norm_eps,
                                logit_scale=1.0 if logit_scale is None else float(logit_scale))
        return ArchConfig.from_hf(hf, qk_norm=bool(getattr(hf, "use_qk_norm", False)),
                                  o_proj_bias=bool(getattr(hf, "attention_bias", False)),
                                  options=options)

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        eps = cfg.options.layer_norm_eps
        qk_norm = None
        if cfg.qk_norm:
            def qk_norm(num_heads: int, head_dim: int) -> nn.Module:
                return CohereLayerNorm((num_heads, head_dim), eps)
        return DecoderParts(
            norm=functools.partial(CohereLayerNorm, eps=eps), layout=PARALLEL, qk_norm=qk_norm,
            rope_interleaved=True, rope_in_fp32=True, round_rope_tables=True,
            logit_scale=cfg.options.logit_scale,
        )
