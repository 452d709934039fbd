"""Gemma 2 (``Gemma2ForCausalLM``): Gemma with sandwich norms, soft-capping and local layers.

* a norm before and after both attention and MLP (``SANDWICH`` layout);
* attention scores scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped
  (``attn_logit_softcapping``), logits soft-capped (``final_logit_softcapping``);
* sliding-window attention on the layers ``layer_types`` marks (every other one).
"""

from __future__ import annotations

from dataclasses import dataclass

from molink.model.arch_config import ArchConfig, FamilyOptions
from molink.model.gemma import check_causal, gemma_norm
from molink.model.layers.decoder import SANDWICH, DecoderLM, DecoderParts


@dataclass(frozen=True)
class Gemma2Options(FamilyOptions):
    query_pre_attn_scalar: float  # attention scores scaled by its inverse square root
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None


class Gemma2ForCausalLM(DecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        check_causal(hf)
        options = Gemma2Options(query_pre_attn_scalar=hf.query_pre_attn_scalar,
                                attn_logit_softcapping=hf.attn_logit_softcapping,
                                final_logit_softcapping=hf.final_logit_softcapping)
        return ArchConfig.from_hf(hf, hidden_act=hf.hidden_activation, options=options,
                                  o_proj_bias=bool(getattr(hf, "attention_bias", False)))

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        options: Gemma2Options = cfg.options
        return DecoderParts(
            norm=gemma_norm(cfg), layout=SANDWICH, embed_scale=cfg.hidden_size**0.5,
            attn_scale=options.query_pre_attn_scalar ** -0.5,
            attn_softcap=options.attn_logit_softcapping,
            final_softcap=options.final_logit_softcapping,
        )
