"""Gemma 3, text only (``Gemma3ForCausalLM``): Gemma 2's block with q/k norm, local/global rope.

Differences from Gemma 2:

* per-head (1 + w) RMSNorm on q and k before RoPE; no attention soft-capping (HF ignores
  ``attn_logit_softcapping`` here), optional final logit soft-capping;
* local (sliding-window) layers rotate with their own theta (``rope_local_base_freq``,
  ``rope_parameters["sliding_attention"]``); global layers use
  ``rope_parameters["full_attention"]``, possibly scaled (``linear`` in the larger models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from molink.model.arch_config import FULL_ATTENTION, SLIDING_ATTENTION, ArchConfig, FamilyOptions
from molink.model.gemma import GemmaRMSNorm, check_causal, gemma_norm
from molink.model.layers.decoder import SANDWICH, DecoderLM, DecoderParts
from molink.model.layers.rotary import RotaryEmbedding

_DEFAULT_THETA = {FULL_ATTENTION: 1_000_000.0, SLIDING_ATTENTION: 10_000.0}


def _rope_of(hf, layer_type: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling or None) of one layer type, from ``rope_parameters`` keyed by type."""
    params = (getattr(hf, "rope_parameters", None) or {}).get(layer_type) or {}
    theta = float(params.get("rope_theta", _DEFAULT_THETA[layer_type]))
    scaling = None if params.get("rope_type", "default") == "default" else dict(params)
    return theta, scaling


@dataclass(frozen=True)
class Gemma3Options(FamilyOptions):
    query_pre_attn_scalar: float
    final_logit_softcapping: float | None
    local_rope_theta: float  # rotary of the sliding-window (local) layers
    local_rope_scaling: dict[str, Any] | None


class Gemma3ForCausalLM(DecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        check_causal(hf)
        global_theta, global_scaling = _rope_of(hf, FULL_ATTENTION)
        local_theta, local_scaling = _rope_of(hf, SLIDING_ATTENTION)
        return ArchConfig.from_hf(
            hf, hidden_act=hf.hidden_activation, qk_norm=True,
            rope_theta=global_theta, rope_scaling=global_scaling,
            o_proj_bias=bool(getattr(hf, "attention_bias", False)),
            options=Gemma3Options(query_pre_attn_scalar=hf.query_pre_attn_scalar,
                                  final_logit_softcapping=hf.final_logit_softcapping,
                                  local_rope_theta=local_theta, local_rope_scaling=local_scaling),
        )

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        eps, options = cfg.rms_norm_eps, cfg.options
        return DecoderParts(
            norm=gemma_norm(cfg), layout=SANDWICH,
            qk_norm=lambda num_heads, head_dim: GemmaRMSNorm(head_dim, eps),
            embed_scale=cfg.hidden_size**0.5,
            attn_scale=options.query_pre_attn_scalar ** -0.5,
            final_softcap=options.final_logit_softcapping,
        )

    @staticmethod
    def rotaries(cfg: ArchConfig) -> dict[str, RotaryEmbedding]:
        return {
            FULL_ATTENTION: RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
            SLIDING_ATTENTION: RotaryEmbedding(cfg.head_dim, cfg.options.local_rope_theta,
                                               cfg.options.local_rope_scaling),
        }

    @staticmethod
    def rope_key(cfg: ArchConfig, layer: int) -> str:
        return cfg.layer_types[layer]
