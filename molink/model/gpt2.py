"""GPT-2 (``GPT2LMHeadModel``): learned absolute positions, LayerNorm, GELU MLP, fused c_attn.

GPT-2 checkpoints store their projections as ``Conv1D`` weights, transposed against
``nn.Linear``: ``[in_features, out_features]``. The parameters here keep that layout, so
they load by name with no transposition, and compute ``x @ W + b``.

The first stage owns both ``wte`` (tokens) and ``wpe`` (positions); the last owns ``ln_f``
and the LM head (tied to ``wte`` unless the config says otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from molink.model.arch_config import ArchConfig, FamilyOptions
from molink.model.config_view import ConfigView
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.mlp import DenseMLP
from molink.model.layers.stage_model import BodyNames, StageBody, StageModel


@dataclass(frozen=True)
class GPT2Options(FamilyOptions):
    layer_norm_eps: float
    scale_attn_weights: bool  # scores scaled by head_dim ** -0.5
    scale_attn_by_inverse_layer_idx: bool  # and by 1 / (layer + 1)


class Conv1D(nn.Module):
    """A linear layer with the weight stored ``[in_features, out_features]`` (checkpoint layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        assert bias, "GPT-2 projections always have a bias"
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        return torch.addmm(self.bias, x, self.weight)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.c_attn = Conv1D(cfg.hidden_size, 3 * cfg.hidden_size)  # q | k | v
        self.c_proj = Conv1D(cfg.hidden_size, cfg.hidden_size)
        options: GPT2Options = cfg.options
        scale = self.head_dim**-0.5 if options.scale_attn_weights else 1.0
        if options.scale_attn_by_inverse_layer_idx:
            scale /= float(layer + 1)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale=scale)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.c_attn(x).view(num_tokens, 3, self.num_heads, self.head_dim)  # [T, 3, H, D]
        q, k, v = qkv.unbind(1)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int) -> None:
        super().__init__()
        eps = cfg.options.layer_norm_eps
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.attn = GPT2Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                            ("c_fc", "c_proj"), linear=Conv1D)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), meta)
        return h + self.mlp(self.ln_2(h))


class GPT2Body(StageBody):
    """``transformer.*`` of the checkpoint: ``wte`` and ``wpe``, a range of blocks, ``ln_f``."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        eps = cfg.options.layer_norm_eps
        super().__init__(cfg, start_layer, end_layer, lambda i: GPT2Block(cfg, i),
                         lambda: nn.LayerNorm(cfg.hidden_size, eps=eps),
                         BodyNames("wte", "h", "ln_f"))
        if self.is_first:
            self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids) + self.wpe(positions)  # [T, hidden]


class GPT2LMHeadModel(StageModel):
    """The LM head is tied to ``wte`` unless the config says otherwise."""

    body_cls = GPT2Body
    body_attr = "transformer"

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        view = ConfigView(hf, intermediate_size=hf.n_inner or 4 * hf.hidden_size)
        options = GPT2Options(
            layer_norm_eps=hf.layer_norm_epsilon, scale_attn_weights=bool(hf.scale_attn_weights),
            scale_attn_by_inverse_layer_idx=bool(hf.scale_attn_by_inverse_layer_idx))
        return ArchConfig.from_hf(view, hidden_act=hf.activation_function, attention_bias=True,
                                  mlp_bias=True, options=options)
