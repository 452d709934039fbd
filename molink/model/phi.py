"""Phi-1 / 1.5 / 2 (``PhiForCausalLM``): partial rotary, one LayerNorm feeding a parallel block.

Each layer computes ``h + attn(ln(h)) + mlp(ln(h))``. Only the first
``partial_rotary_factor * head_dim`` dims of each q/k head are rotated. q/k/v carry bias and
are fused into one matmul at load time; ``dense`` is the output projection, ``fc1``/``fc2``
the MLP, and the LM head has a bias. ``qk_layernorm`` adds a LayerNorm on each q/k head.
"""

from __future__ import annotations

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.mlp import get_activation
from molink.model.layers.rotary import RotaryEmbedding, apply_partial_rotary
from molink.model.layers.stage_model import StageModel


class PhiAttention(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one matmul; filled from the checkpoint's q_proj, k_proj, v_proj.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=True)
        self.dense = nn.Linear(self.q_size, cfg.hidden_size, bias=True)
        self.qk_layernorm = cfg.qk_norm
        if self.qk_layernorm:
            eps = cfg.extra["layer_norm_eps"]
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=eps)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   scale=self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        return self.dense(self.attn(q, k, v, meta))


class PhiMLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.extra["layer_norm_eps"])
        self.self_attn = PhiAttention(cfg, rotary)
        self.mlp = PhiMLP(cfg)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        normed = self.input_layernorm(h)
        return h + (self.self_attn(normed, cos, sin, meta) + self.mlp(normed))


class PhiBody(nn.Module):
    """``model.*`` of the checkpoint: embeddings, a range of layers, ``final_layernorm``."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.is_first = start_layer == 0
        self.is_last = end_layer == cfg.num_layers
        if self.is_first:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rotary_dim = int(cfg.head_dim * cfg.extra["partial_rotary_factor"])
        self.rotary = RotaryEmbedding(rotary_dim, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleDict({str(i): PhiDecoderLayer(cfg, self.rotary)
                                     for i in range(start_layer, end_layer)})
        if self.is_last:
            self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.extra["layer_norm_eps"])

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None, hidden_states: torch.Tensor | None) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if self.is_first else hidden_states  # [T, hidden]
        cos, sin = self.rotary.cos_sin(positions)  # [T, 1, rotary_dim]
        for layer in self.layers.values():
            h = layer(h, cos, sin, meta)
        return self.final_layernorm(h) if self.is_last else h


class PhiForCausalLM(StageModel):
    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.attach_body(cfg, start_layer, end_layer, "model",
                         PhiBody(cfg, start_layer, end_layer), lm_head_bias=True)

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        return ArchConfig.from_hf(
            hf, attention_bias=True, mlp_bias=True, qk_norm=bool(hf.qk_layernorm),
            extra=dict(layer_norm_eps=hf.layer_norm_eps,
                       partial_rotary_factor=_partial_rotary_factor(hf)),
        )

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, hidden]: final_layernorm output on the last stage, else the residual stream."""
        return self.model(positions, meta, input_ids, hidden_states)

    def checkpoint_names(self, param_name: str) -> list[str]:
        """``qkv_proj`` reads q/k/v_proj; a tied LM head reads the embedding (its bias stays)."""
        if param_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return ["model.embed_tokens.weight"]
        if ".qkv_proj." in param_name:
            return [param_name.replace(".qkv_proj.", f".{part}.")
                    for part in ("q_proj", "k_proj", "v_proj")]
        return [param_name]


def _partial_rotary_factor(hf) -> float:
    """Where the factor lives depends on the transformers version (v5: in rope_parameters)."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return float(params["partial_rotary_factor"])
    return float(getattr(hf, "partial_rotary_factor", 1.0))
