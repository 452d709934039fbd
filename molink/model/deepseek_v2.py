"""DeepSeek-V2 / V2.5 (``DeepseekV2ForCausalLM``): multi-head latent attention and DeepSeekMoE.

Each layer is pre-norm ``MultiHeadLatentAttention`` plus either a dense gated MLP (the first
``first_k_dense_replace`` layers) or ``DeepseekMoE`` (softmax routing, greedy or
group-limited top-k). DeepSeek-V3 (``deepseek_v3.py``) is this model with sigmoid,
bias-corrected routing and an optional non-interleaved RoPE layout.
"""

from __future__ import annotations

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.attention import AttentionMetadata
from molink.model.layers.decoder import FUSED_PROJECTIONS
from molink.model.layers.deepseek_moe import TOPK_METHODS, DeepseekMoE, DeepseekRouter
from molink.model.layers.mla import MultiHeadLatentAttention
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.norm import RMSNorm
from molink.model.layers.rotary import RotaryEmbedding
from molink.model.layers.stage_model import StageModel

# Stacked expert parameter -> the per-expert matrices it is made of (in row order).
_PER_EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if layer >= cfg.extra["first_k_dense_replace"]:
            self.mlp = _moe(cfg)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                                cfg.mlp_bias)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


def _moe(cfg: ArchConfig) -> DeepseekMoE:
    extra = cfg.extra
    router = DeepseekRouter(
        cfg.hidden_size, extra["n_routed_experts"], extra["num_experts_per_tok"],
        extra["topk_method"], extra["n_group"], extra["topk_group"], extra["norm_topk_prob"],
        extra["routed_scaling_factor"])
    return DeepseekMoE(cfg.hidden_size, cfg.hidden_act, cfg.mlp_bias, router,
                       extra["moe_intermediate_size"], extra["n_shared_experts"])


class DeepseekBody(nn.Module):
    """``model.*`` of the checkpoint: embeddings, a range of layers, final norm."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.is_first = start_layer == 0
        self.is_last = end_layer == cfg.num_layers
        if self.is_first:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # RoPE covers only the qk_rope_head_dim part of each head.
        self.rotary = RotaryEmbedding(cfg.extra["qk_rope_head_dim"], cfg.rope_theta,
                                      cfg.rope_scaling)
        # Keys are absolute layer indices so names match the checkpoint.
        self.layers = nn.ModuleDict(
            {str(i): DeepseekDecoderLayer(cfg, i) for i in range(start_layer, end_layer)})
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if self.is_first else hidden_states  # [T, hidden]
        cos, sin = self.rotary.cos_sin(positions)  # [T, 1, qk_rope_head_dim]
        for layer in self.layers.values():
            h = layer(h, cos, sin, meta)
        return self.norm(h) if self.is_last else h


class DeepseekV2ForCausalLM(StageModel):
    """A DeepSeek-V2 causal LM restricted to ``[start_layer, end_layer)``."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.attach_body(cfg, start_layer, end_layer, "model",
                         DeepseekBody(cfg, start_layer, end_layer), lm_head_bias=False)
        self._checkpoint_tensor_names: frozenset[str] = frozenset()

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        topk_method = getattr(hf, "topk_method", None) or "greedy"
        # transformers' V2 router never normalises the top-k weights; neither do we.
        return deepseek_arch_config(hf, topk_method=topk_method, norm_topk_prob=False,
                                    rope_interleave=True)

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, hidden]: normed final hidden states on the last stage, else the residual."""
        return self.model(positions, meta, input_ids=input_ids, hidden_states=hidden_states)

    def select_checkpoint_layout(self, names: frozenset[str]) -> None:
        """Called by the loader, before ``checkpoint_names``, with every tensor name it holds."""
        self._checkpoint_tensor_names = names

    def checkpoint_names(self, param_name: str) -> list[str]:
        """Checkpoint tensors that fill a parameter, concatenated along dim 0.

        Stacked experts absent from the checkpoint are read per expert, in expert order, and
        the loader views the concatenation as ``[E, rows, cols]``::

            experts.gate_up_proj <- [e0.gate_proj, e0.up_proj, e1.gate_proj, e1.up_proj, ...]
            experts.down_proj    <- [e0.down_proj, e1.down_proj, ...]
        """
        if param_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return ["model.embed_tokens.weight"]
        prefix, _, leaf = param_name.rpartition(".experts.")
        if prefix and leaf in _PER_EXPERT_PARTS and param_name not in self._checkpoint_tensor_names:
            return [f"{prefix}.experts.{e}.{part}.weight"
                    for e in range(self.cfg.extra["n_routed_experts"])
                    for part in _PER_EXPERT_PARTS[leaf]]
        for fused, parts in FUSED_PROJECTIONS.items():
            if f".{fused}." in param_name:
                return [param_name.replace(f".{fused}.", f".{part}.") for part in parts]
        return [param_name]


def deepseek_arch_config(hf, **extra) -> ArchConfig:
    """ArchConfig of a DeepSeek V2/V3 config; ``extra`` adds the family's routing settings.

    The paged cache holds decompressed per-head keys, so ``head_dim`` is the key width and
    every head has its own KV (``num_kv_heads == num_heads``).
    """
    if getattr(hf, "quantization_config", None):
        method = dict(hf.quantization_config).get("quant_method", "?")
        raise ValueError(f"quantization_config ({method}) is not supported for "
                         f"{type(hf).__name__}; use a bfloat16 checkpoint")
    if extra["topk_method"] not in TOPK_METHODS:
        raise ValueError(f"topk_method {extra['topk_method']!r} is not supported "
                         f"(supported: {', '.join(TOPK_METHODS)})")
    qk_head_dim = hf.qk_nope_head_dim + hf.qk_rope_head_dim
    return ArchConfig.from_hf(
        hf, head_dim=qk_head_dim, num_kv_heads=hf.num_attention_heads,
        extra=dict(
            q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
            qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim,
            v_head_dim=hf.v_head_dim,
            first_k_dense_replace=hf.first_k_dense_replace or 0,
            n_routed_experts=hf.n_routed_experts, n_shared_experts=hf.n_shared_experts or 0,
            num_experts_per_tok=hf.num_experts_per_tok,
            moe_intermediate_size=hf.moe_intermediate_size,
            routed_scaling_factor=float(hf.routed_scaling_factor),
            n_group=hf.n_group, topk_group=hf.topk_group,
            **extra,
        ),
    )

