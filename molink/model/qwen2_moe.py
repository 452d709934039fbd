"""Qwen1.5-MoE / Qwen2-MoE (``Qwen2MoeForCausalLM``): Qwen2 with sparse MoE blocks.

Each sparse block adds a shared expert, gated per token by a sigmoid, to the routed
experts. Routing: softmax over all experts, top-k, renormalised only if ``norm_topk_prob``.
Layers listed in ``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, keep a dense
MLP of ``intermediate_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLayer, DecoderLM
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.moe import (
    ExpertCheckpointMixin,
    MoeOptions,
    SparseMoeBlock,
    router_and_experts,
)


@dataclass(frozen=True)
class QwenMoeOptions(MoeOptions):
    moe_intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: tuple[int, ...]  # layers with a sparse block (the others: a dense MLP)
    shared_expert_intermediate_size: int


def qwen_moe_options(hf) -> QwenMoeOptions:
    """MoE settings of a Qwen2-MoE / Qwen3-MoE config."""
    num_layers = hf.num_hidden_layers
    mlp_only = set(getattr(hf, "mlp_only_layers", None) or [])
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    sparse = tuple(
        i for i in range(num_layers)
        if i not in mlp_only and hf.num_experts > 0 and (i + 1) % step == 0
    )
    return QwenMoeOptions(
        num_experts=hf.num_experts, num_experts_per_tok=hf.num_experts_per_tok,
        moe_intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
        sparse_layers=sparse,
        shared_expert_intermediate_size=getattr(hf, "shared_expert_intermediate_size", 0))


class Qwen2MoeDecoderLayer(DecoderLayer):
    has_shared_expert = True

    def build_mlp(self, cfg: ArchConfig, layer: int) -> nn.Module:
        options: QwenMoeOptions = cfg.options
        if layer not in options.sparse_layers:
            return super().build_mlp(cfg, layer)
        gate, experts = router_and_experts(cfg, options.moe_intermediate_size,
                                           renormalize=options.norm_topk_prob)
        if not self.has_shared_expert:
            return SparseMoeBlock(gate, experts)
        shared = GatedMLP(cfg.hidden_size, options.shared_expert_intermediate_size,
                          cfg.hidden_act)
        return SparseMoeBlock(gate, experts, shared, nn.Linear(cfg.hidden_size, 1, bias=False))


class Qwen2MoeForCausalLM(ExpertCheckpointMixin, DecoderLM):
    layer_cls = Qwen2MoeDecoderLayer

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        return ArchConfig.from_hf(hf, attention_bias=bool(getattr(hf, "qkv_bias", True)),
                                  options=qwen_moe_options(hf))
