"""DeepSeek-V2 / V2.5 (``DeepseekV2ForCausalLM``): multi-head latent attention and DeepSeekMoE.

Each layer is pre-norm ``MultiHeadLatentAttention`` plus either a dense gated MLP (the first
``first_k_dense_replace`` layers) or ``DeepseekMoE`` (softmax routing, greedy or
group-limited top-k). DeepSeek-V3 (``deepseek_v3.py``) is this model with sigmoid,
bias-corrected routing and an optional non-interleaved RoPE layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLayer, DecoderLM, DecoderParts
from molink.model.layers.deepseek_moe import TOPK_METHODS, DeepseekMoE, DeepseekRouter
from molink.model.layers.mla import MultiHeadLatentAttention
from molink.model.layers.moe import ExpertCheckpointMixin, MoeOptions


@dataclass(frozen=True)
class DeepseekOptions(MoeOptions):
    """``num_experts`` is the config's ``n_routed_experts``."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    first_k_dense_replace: int  # layers below this keep a dense MLP
    n_shared_experts: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    n_group: int | None
    topk_group: int | None
    topk_method: str  # one of TOPK_METHODS
    norm_topk_prob: bool
    rope_interleave: bool


class DeepseekDecoderLayer(DecoderLayer):
    """Pre-norm MLA plus a dense MLP (first layers) or DeepSeekMoE."""

    def build_attention(self, cfg: ArchConfig, layer: int, parts: DecoderParts) -> nn.Module:
        return MultiHeadLatentAttention(cfg, layer)

    def build_mlp(self, cfg: ArchConfig, layer: int) -> nn.Module:
        options: DeepseekOptions = cfg.options
        if layer < options.first_k_dense_replace:
            return super().build_mlp(cfg, layer)
        router = DeepseekRouter(
            cfg.hidden_size, options.num_experts, options.num_experts_per_tok,
            options.topk_method, options.n_group, options.topk_group, options.norm_topk_prob,
            options.routed_scaling_factor)
        return DeepseekMoE(cfg.hidden_size, cfg.hidden_act, cfg.mlp_bias, router,
                           options.moe_intermediate_size, options.n_shared_experts)


class DeepseekV2ForCausalLM(ExpertCheckpointMixin, DecoderLM):
    """A DeepSeek-V2 causal LM restricted to ``[start_layer, end_layer)``.

    Stacked experts absent from the checkpoint are read per expert, in expert order
    (``ExpertCheckpointMixin``); RoPE covers only the ``qk_rope_head_dim`` part of each head.
    """

    layer_cls = DeepseekDecoderLayer

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        topk_method = getattr(hf, "topk_method", None) or "greedy"
        # transformers' V2 router never normalises the top-k weights; neither do we.
        return deepseek_arch_config(hf, topk_method=topk_method, norm_topk_prob=False,
                                    rope_interleave=True)


def deepseek_arch_config(hf, *, topk_method: str, norm_topk_prob: bool,
                         rope_interleave: bool) -> ArchConfig:
    """ArchConfig of a DeepSeek V2/V3 config, given the family's routing settings.

    The paged cache holds decompressed per-head keys, so ``head_dim`` is the key width and
    every head has its own KV (``num_kv_heads == num_heads``).
    """
    if getattr(hf, "quantization_config", None):
        method = dict(hf.quantization_config).get("quant_method", "?")
        raise ValueError(f"quantization_config ({method}) is not supported for "
                         f"{type(hf).__name__}; use a bfloat16 checkpoint")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method {topk_method!r} is not supported "
                         f"(supported: {', '.join(TOPK_METHODS)})")
    options = DeepseekOptions(
        num_experts=hf.n_routed_experts, num_experts_per_tok=hf.num_experts_per_tok,
        q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
        qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim, first_k_dense_replace=hf.first_k_dense_replace or 0,
        n_shared_experts=hf.n_shared_experts or 0, moe_intermediate_size=hf.moe_intermediate_size,
        routed_scaling_factor=float(hf.routed_scaling_factor),
        n_group=hf.n_group, topk_group=hf.topk_group,
        topk_method=topk_method, norm_topk_prob=norm_topk_prob, rope_interleave=rope_interleave)
    return ArchConfig.from_hf(
        hf, head_dim=hf.qk_nope_head_dim + hf.qk_rope_head_dim,
        num_kv_heads=hf.num_attention_heads, rotary_dim=hf.qk_rope_head_dim, options=options)
