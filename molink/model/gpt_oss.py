"""gpt-oss (``GptOssForCausalLM``): sparse MoE decoder with attention sinks.

Differences from the Llama decoder:

* attention: biases on q/k/v/o; one learned sink logit per head in every softmax;
  layers alternate sliding-window and full attention (``layer_types``); YaRN RoPE whose
  attention factor scales cos and sin;
* MoE: a router with bias picks the top-k logits and softmaxes over those only; experts
  are fused 3-D tensors stored ``[in, out]`` with biases, gate and up interleaved column by
  column, and a clamped SwiGLU ``(up + 1) * gate * sigmoid(alpha * gate)``;
* RMSNorm multiplies by its weight in float32 before casting back.

Checkpoints quantized to MXFP4 (``*_blocks`` / ``*_scales``) are not read; use a
dequantized (bf16) checkpoint.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLayer, DecoderLM, DecoderParts
from molink.model.layers.moe import (
    TOPK_THEN_SOFTMAX,
    FusedExperts,
    MoeOptions,
    TopKRouter,
    clamped_swiglu,
)
from molink.model.layers.norm import Fp32WeightRMSNorm


@dataclass(frozen=True)
class GptOssOptions(MoeOptions):
    swiglu_alpha: float
    swiglu_limit: float


class GptOssMLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        options: GptOssOptions = cfg.options
        self.router = TopKRouter(cfg.hidden_size, options.num_experts,
                                 options.num_experts_per_tok, scoring=TOPK_THEN_SOFTMAX,
                                 bias=True)
        glu = clamped_swiglu(options.swiglu_alpha, options.swiglu_limit)
        self.experts = FusedExperts(options.num_experts, cfg.hidden_size,
                                    cfg.intermediate_size, glu, transposed=True, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        expert_ids, expert_weights = self.router(x)
        return self.experts(x, expert_ids, expert_weights)


class GptOssDecoderLayer(DecoderLayer):
    def build_mlp(self, cfg: ArchConfig, layer: int) -> nn.Module:
        return GptOssMLP(cfg)


class GptOssForCausalLM(DecoderLM):
    layer_cls = GptOssDecoderLayer

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        if getattr(hf, "quantization_config", None):
            raise ValueError(
                "quantized gpt-oss checkpoints (quantization_config in config.json, e.g. "
                "MXFP4 experts) are not supported; use a dequantized bf16 checkpoint"
            )
        bias = bool(getattr(hf, "attention_bias", True))
        options = GptOssOptions(num_experts=hf.num_local_experts,
                                num_experts_per_tok=hf.num_experts_per_tok,
                                swiglu_alpha=float(hf.swiglu_alpha),
                                swiglu_limit=float(hf.swiglu_limit))
        return ArchConfig.from_hf(hf, attention_bias=bias, o_proj_bias=bias, options=options)

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        return DecoderParts(norm=functools.partial(Fp32WeightRMSNorm, eps=cfg.rms_norm_eps),
                            attention_sinks=True)
