"""The Llama-family decoder (pre-norm, rotary GQA attention, gated MLP) over a layer range.

``DecoderLM`` holds only what its stage needs: layers ``[start_layer, end_layer)``, plus the
embeddings on the first stage and the final norm and LM head on the last. Parameter names
equal the Hugging Face checkpoint names (``model.layers.12.mlp.up_proj.weight``), so a
stage loads its tensors by name and nothing else.

Across a hop only the hidden state travels: each layer adds its residual in place, so no
separate residual tensor exists (one tensor per token per hop).
"""

from __future__ import annotations

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.norm import RMSNorm
from molink.model.layers.rotary import RotaryEmbedding, apply_rotary
from molink.model.layers.stage_model import StageModel


class RotaryAttention(nn.Module):
    """q/k/v projections, optional q/k RMSNorm (Qwen3), RoPE, paged attention, output projection."""

    def __init__(self, cfg: ArchConfig, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one matmul; filled from the checkpoint's q_proj, k_proj, v_proj.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size,
                                bias=cfg.extra.get("o_proj_bias", False))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   scale=self.head_dim**-0.5, window=cfg.window_of(layer))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q, k, v, meta))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = RotaryAttention(cfg, layer, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = self.build_mlp(cfg, layer)

    def build_mlp(self, cfg: ArchConfig, layer: int) -> nn.Module:
        """The feed-forward block of ``layer``; MoE models return a sparse block here."""
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderBody(nn.Module):
    """``model.*`` of the checkpoint: embeddings, a range of layers, final norm."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int,
                 layer_cls: type[nn.Module] = DecoderLayer) -> None:
        super().__init__()
        self.is_first = start_layer == 0
        self.is_last = end_layer == cfg.num_layers
        if self.is_first:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # Keys are absolute layer indices so names match the checkpoint.
        self.layers = nn.ModuleDict(
            {str(i): layer_cls(cfg, i, self.rotary) for i in range(start_layer, end_layer)}
        )
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if self.is_first else hidden_states  # [T, hidden]
        cos, sin = self.rotary.cos_sin(positions)
        for layer in self.layers.values():
            h = layer(h, cos, sin, meta)
        return self.norm(h) if self.is_last else h


class DecoderLM(StageModel):
    """A causal LM restricted to ``[start_layer, end_layer)``; the base of every Llama-like model."""

    layer_cls: type[nn.Module] = DecoderLayer

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        body = DecoderBody(cfg, start_layer, end_layer, self.layer_cls)
        self.attach_body(cfg, start_layer, end_layer, "model", body, lm_head_bias=False)

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, hidden]: normed final hidden states on the last stage, else the residual stream."""
        return self.model(positions, meta, input_ids=input_ids, hidden_states=hidden_states)

    def checkpoint_names(self, param_name: str) -> list[str]:
        """Checkpoint tensors that fill a parameter, concatenated along dim 0.

        Fused projections read their parts (``qkv_proj`` <- q/k/v_proj); a tied LM head
        reads the embedding.
        """
        if param_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return ["model.embed_tokens.weight"]
        for fused, parts in FUSED_PROJECTIONS.items():
            if f".{fused}." in param_name:
                return [param_name.replace(f".{fused}.", f".{part}.") for part in parts]
        return [param_name]


FUSED_PROJECTIONS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
