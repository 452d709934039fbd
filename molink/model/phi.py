"""Phi-1 / 1.5 / 2 (``PhiForCausalLM``): partial rotary, one LayerNorm feeding a parallel block.

Each layer computes ``h + (attn(ln(h)) + mlp(ln(h)))`` (``PARALLEL_SUM``). Only the first
``partial_rotary_factor * head_dim`` dims of each q/k head are rotated. q/k/v carry bias and
are fused into one matmul at load time; ``dense`` is the output projection, ``fc1``/``fc2``
the MLP, ``final_layernorm`` the final norm, and the LM head has a bias. ``qk_layernorm``
adds a LayerNorm on each q/k head.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from torch import nn

from molink.model.arch_config import ArchConfig, FamilyOptions
from molink.model.layers.decoder import (
    PARALLEL_SUM,
    DecoderLayer,
    DecoderLM,
    DecoderParts,
    RotaryAttention,
)
from molink.model.layers.mlp import DenseMLP
from molink.model.layers.stage_model import BodyNames


@dataclass(frozen=True)
class PhiOptions(FamilyOptions):
    layer_norm_eps: float


class PhiAttention(RotaryAttention):
    o_proj_name = "dense"
    qk_norm_names = ("q_layernorm", "k_layernorm")


class PhiDecoderLayer(DecoderLayer):
    def build_attention(self, cfg: ArchConfig, layer: int, parts: DecoderParts) -> nn.Module:
        return PhiAttention(cfg, layer, parts)

    def build_mlp(self, cfg: ArchConfig, layer: int) -> nn.Module:
        return DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, ("fc1", "fc2"))


class PhiForCausalLM(DecoderLM):
    """The LM head has a bias; a tied head reads the embedding for its weight only."""

    layer_cls = PhiDecoderLayer
    body_names = BodyNames(norm="final_layernorm")
    lm_head_bias = True

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        arch = ArchConfig.from_hf(hf, attention_bias=True, o_proj_bias=True, mlp_bias=True,
                                  qk_norm=bool(hf.qk_layernorm), sliding_window=None,
                                  options=PhiOptions(layer_norm_eps=hf.layer_norm_eps))
        return dataclasses.replace(arch,
                                   rotary_dim=int(arch.head_dim * _partial_rotary_factor(hf)))

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        norm = functools.partial(nn.LayerNorm, eps=cfg.options.layer_norm_eps)
        qk_norm = (lambda num_heads, head_dim: norm(head_dim)) if cfg.qk_norm else None
        return DecoderParts(norm=norm, layout=PARALLEL_SUM, qk_norm=qk_norm)


def _partial_rotary_factor(hf) -> float:
    """Where the factor lives depends on the transformers version (v5: in rope_parameters)."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return float(params["partial_rotary_factor"])
    return float(getattr(hf, "partial_rotary_factor", 1.0))
