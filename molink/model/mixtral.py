"""Mixtral (``MixtralForCausalLM``): Mistral with a sparse MoE block in place of every MLP.

Routing: softmax over all experts in float32, the top-k of it, renormalised to sum to 1;
the weights stay float32 (as in ``transformers``). Hub checkpoints store the experts per
expert under ``block_sparse_moe`` (``experts.{i}.w1/w3/w2`` = gate/up/down); fused 3-D
``mlp.experts.*`` tensors are read as well.
"""

from __future__ import annotations

from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLayer, DecoderLM
from molink.model.layers.moe import (
    ExpertCheckpointMixin,
    MoeOptions,
    SparseMoeBlock,
    router_and_experts,
)


class MixtralDecoderLayer(DecoderLayer):
    def build_mlp(self, cfg: ArchConfig, layer: int) -> nn.Module:
        return SparseMoeBlock(*router_and_experts(cfg, cfg.intermediate_size, renormalize=True,
                                                  float_weights=True))


class MixtralForCausalLM(ExpertCheckpointMixin, DecoderLM):
    layer_cls = MixtralDecoderLayer
    per_expert_block = "block_sparse_moe"
    per_expert_parts = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        options = MoeOptions(num_experts=hf.num_local_experts,
                             num_experts_per_tok=hf.num_experts_per_tok)
        return ArchConfig.from_hf(hf, options=options)
