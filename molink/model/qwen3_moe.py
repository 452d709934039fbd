"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3 (q/k RMSNorm) with sparse MoE blocks.

Like Qwen2-MoE without the shared expert and without q/k/v bias by default
(``attention_bias``, when set, also covers ``o_proj``).
"""

from __future__ import annotations

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLM
from molink.model.layers.moe import ExpertCheckpointMixin
from molink.model.qwen2_moe import Qwen2MoeDecoderLayer, moe_extra


class Qwen3MoeDecoderLayer(Qwen2MoeDecoderLayer):
    has_shared_expert = False


class Qwen3MoeForCausalLM(ExpertCheckpointMixin, DecoderLM):
    layer_cls = Qwen3MoeDecoderLayer

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        bias = bool(getattr(hf, "attention_bias", False))
        extra = dict(moe_extra(hf), o_proj_bias=bias)
        return ArchConfig.from_hf(hf, qk_norm=True, attention_bias=bias, extra=extra)
