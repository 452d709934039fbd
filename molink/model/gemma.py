"""Gemma (``GemmaForCausalLM``): Llama with (1 + w) RMSNorm, scaled embeddings and GeGLU.

Embeddings are multiplied by sqrt(hidden_size) rounded to the model dtype; ``head_dim`` may
differ from hidden_size / num_heads; the LM head is tied to the embeddings.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLM, DecoderParts
from molink.model.layers.norm import RMSNorm


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaled by (1 + weight), all in float32, then cast back (Gemma 1/2/3)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        nn.init.zeros_(self.weight)  # (1 + w): zero is the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., hidden_size]. Unlike Llama, the weight multiplies before the cast back.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).type_as(x)


def check_causal(hf) -> None:
    """Gemma configs may ask for bidirectional attention (embedding models): not served here."""
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True is not supported: MoLink serves "
                         "causal language models only")


def gemma_norm(cfg: ArchConfig):
    return functools.partial(GemmaRMSNorm, eps=cfg.rms_norm_eps)


class GemmaForCausalLM(DecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        check_causal(hf)
        return ArchConfig.from_hf(hf, o_proj_bias=bool(getattr(hf, "attention_bias", False)))

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        return DecoderParts(norm=gemma_norm(cfg), embed_scale=cfg.hidden_size**0.5)
