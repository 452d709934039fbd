"""Qwen1.5-MoE / Qwen2-MoE (``Qwen2MoeForCausalLM``): Qwen2 with sparse MoE blocks.

Each sparse block adds a shared expert, gated per token by a sigmoid, to the routed
experts. Routing: softmax over all experts, top-k, renormalised only if ``norm_topk_prob``.
Layers listed in ``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, keep a dense
MLP of ``intermediate_size``.
"""

from __future__ import annotations

from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLayer, DecoderLM
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.moe import (
    ExpertCheckpointMixin,
    FusedExperts,
    SparseMoeBlock,
    TopKRouter,
    chunked_glu,
)


def moe_extra(hf) -> dict:
    """MoE settings of a Qwen2-MoE / Qwen3-MoE config, for ``ArchConfig.extra``."""
    num_layers = hf.num_hidden_layers
    mlp_only = set(getattr(hf, "mlp_only_layers", None) or [])
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    sparse = tuple(
        i for i in range(num_layers)
        if i not in mlp_only and hf.num_experts > 0 and (i + 1) % step == 0
    )
    return dict(num_experts=hf.num_experts, num_experts_per_tok=hf.num_experts_per_tok,
                moe_intermediate_size=hf.moe_intermediate_size,
                norm_topk_prob=bool(hf.norm_topk_prob), sparse_layers=sparse,
                shared_expert_intermediate_size=getattr(hf, "shared_expert_intermediate_size", 0))


class Qwen2MoeDecoderLayer(DecoderLayer):
    has_shared_expert = True

    def build_mlp(self, cfg: ArchConfig, layer: int) -> nn.Module:
        extra = cfg.extra
        if layer not in extra["sparse_layers"]:
            return super().build_mlp(cfg, layer)
        gate = TopKRouter(cfg.hidden_size, extra["num_experts"], extra["num_experts_per_tok"],
                          renormalize=extra["norm_topk_prob"])
        experts = FusedExperts(extra["num_experts"], cfg.hidden_size,
                               extra["moe_intermediate_size"], chunked_glu(cfg.hidden_act))
        if not self.has_shared_expert:
            return SparseMoeBlock(gate, experts)
        shared = GatedMLP(cfg.hidden_size, extra["shared_expert_intermediate_size"],
                          cfg.hidden_act)
        return SparseMoeBlock(gate, experts, shared, nn.Linear(cfg.hidden_size, 1, bias=False))


class Qwen2MoeForCausalLM(ExpertCheckpointMixin, DecoderLM):
    layer_cls = Qwen2MoeDecoderLayer

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        return ArchConfig.from_hf(hf, attention_bias=bool(getattr(hf, "qkv_bias", True)),
                                  extra=moe_extra(hf))
