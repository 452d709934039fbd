"""Gemma 2 (``Gemma2ForCausalLM``): Gemma with sandwich norms, soft-capping and local layers.

* a norm before and after both attention and MLP (``SANDWICH`` layout);
* attention scores scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped
  (``attn_logit_softcapping``), logits soft-capped (``final_logit_softcapping``);
* sliding-window attention on the layers ``layer_types`` marks (every other one).
"""

from __future__ import annotations

from molink.model.arch_config import ArchConfig
from molink.model.gemma import check_causal, gemma_norm
from molink.model.layers.variant_decoder import SANDWICH, DecoderParts, VariantDecoderLM


class Gemma2ForCausalLM(VariantDecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        check_causal(hf)
        return ArchConfig.from_hf(hf, hidden_act=hf.hidden_activation, extra=dict(
            query_pre_attn_scalar=hf.query_pre_attn_scalar,
            attn_logit_softcapping=hf.attn_logit_softcapping,
            final_logit_softcapping=hf.final_logit_softcapping,
        ))

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        return DecoderParts(
            norm=gemma_norm(cfg), layout=SANDWICH, o_proj_bias=cfg.attention_bias,
            embed_scale=cfg.hidden_size**0.5,
            attn_scale=cfg.extra["query_pre_attn_scalar"] ** -0.5,
            attn_softcap=cfg.extra["attn_logit_softcapping"],
            final_softcap=cfg.extra["final_logit_softcapping"],
        )
