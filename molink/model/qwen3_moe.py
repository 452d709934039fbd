"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3 (q/k RMSNorm) with sparse MoE blocks.

Like Qwen2-MoE without the shared expert and without q/k/v bias by default
(``attention_bias``, when set, also covers ``o_proj``).
"""

from __future__ import annotations

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLM
from molink.model.layers.moe import ExpertCheckpointMixin
from molink.model.qwen2_moe import Qwen2MoeDecoderLayer, qwen_moe_options


class Qwen3MoeDecoderLayer(Qwen2MoeDecoderLayer):
    has_shared_expert = False


class Qwen3MoeForCausalLM(ExpertCheckpointMixin, DecoderLM):
    layer_cls = Qwen3MoeDecoderLayer

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        bias = bool(getattr(hf, "attention_bias", False))
        return ArchConfig.from_hf(hf, qk_norm=True, attention_bias=bias, o_proj_bias=bias,
                                  options=qwen_moe_options(hf))
