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

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.attention import AttentionMetadata
from molink.model.layers.decoder import DecoderLM, RotaryAttention
from molink.model.layers.moe import (
    TOPK_THEN_SOFTMAX,
    FusedExperts,
    TopKRouter,
    clamped_swiglu,
)
from molink.model.layers.norm import RMSNorm
from molink.model.layers.rotary import RotaryEmbedding, apply_rotary


class GptOssRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(input_dtype)


class GptOssAttention(RotaryAttention):
    def __init__(self, cfg: ArchConfig, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__(cfg, layer, rotary)
        self.sinks = nn.Parameter(torch.empty(cfg.num_heads))  # one logit per head

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q, k, v, meta, sinks=self.sinks))


class GptOssMLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        extra = cfg.extra
        self.router = TopKRouter(cfg.hidden_size, extra["num_experts"],
                                 extra["num_experts_per_tok"], scoring=TOPK_THEN_SOFTMAX,
                                 bias=True)
        glu = clamped_swiglu(extra["swiglu_alpha"], extra["swiglu_limit"])
        self.experts = FusedExperts(extra["num_experts"], cfg.hidden_size,
                                    cfg.intermediate_size, glu, transposed=True, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        expert_ids, expert_weights = self.router(x)
        return self.experts(x, expert_ids, expert_weights)


class GptOssDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GptOssAttention(cfg, layer, rotary)
        self.post_attention_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GptOssMLP(cfg)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class GptOssForCausalLM(DecoderLM):
    layer_cls = GptOssDecoderLayer

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__(cfg, start_layer, end_layer)
        if self.is_last:
            self.model.norm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        if getattr(hf, "quantization_config", None):
            raise ValueError(
                "quantized gpt-oss checkpoints (quantization_config in config.json, e.g. "
                "MXFP4 experts) are not supported; use a dequantized bf16 checkpoint"
            )
        bias = bool(getattr(hf, "attention_bias", True))
        extra = dict(o_proj_bias=bias, num_experts=hf.num_local_experts,
                     num_experts_per_tok=hf.num_experts_per_tok,
                     swiglu_alpha=float(hf.swiglu_alpha), swiglu_limit=float(hf.swiglu_limit))
        return ArchConfig.from_hf(hf, attention_bias=bias, extra=extra)
