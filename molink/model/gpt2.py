"""GPT-2 (``GPT2LMHeadModel``): learned absolute positions, LayerNorm, GELU MLP, fused c_attn.

GPT-2 checkpoints store their projections as ``Conv1D`` weights, transposed against
``nn.Linear``: ``[in_features, out_features]``. The parameters here keep that layout, so
they load by name with no transposition, and compute ``x @ W + b``.

The first stage owns both ``wte`` (tokens) and ``wpe`` (positions); the last owns ``ln_f``
and the LM head (tied to ``wte`` unless the config says otherwise).
"""

from __future__ import annotations

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.config_view import ConfigView
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.mlp import get_activation
from molink.model.layers.stage_model import StageModel


class Conv1D(nn.Module):
    """A linear layer with the weight stored ``[in_features, out_features]`` (checkpoint layout)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
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
        scale = self.head_dim**-0.5 if cfg.extra["scale_attn_weights"] else 1.0
        if cfg.extra["scale_attn_by_inverse_layer_idx"]:
            scale /= float(layer + 1)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale=scale)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.c_attn(x).view(num_tokens, 3, self.num_heads, self.head_dim)  # [T, 3, H, D]
        q, k, v = qkv.unbind(1)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = Conv1D(cfg.intermediate_size, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int) -> None:
        super().__init__()
        eps = cfg.extra["layer_norm_eps"]
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.attn = GPT2Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), meta)
        return h + self.mlp(self.ln_2(h))


class GPT2Body(nn.Module):
    """``transformer.*`` of the checkpoint: embeddings, a range of blocks, final LayerNorm."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.is_first = start_layer == 0
        self.is_last = end_layer == cfg.num_layers
        if self.is_first:
            self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleDict({str(i): GPT2Block(cfg, i) for i in range(start_layer, end_layer)})
        if self.is_last:
            self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.extra["layer_norm_eps"])

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None, hidden_states: torch.Tensor | None) -> torch.Tensor:
        if self.is_first:
            h = self.wte(input_ids) + self.wpe(positions)  # [T, hidden]
        else:
            h = hidden_states
        for block in self.h.values():
            h = block(h, meta)
        return self.ln_f(h) if self.is_last else h


class GPT2LMHeadModel(StageModel):
    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.attach_body(cfg, start_layer, end_layer, "transformer",
                         GPT2Body(cfg, start_layer, end_layer), lm_head_bias=False)

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        hidden_size = hf.hidden_size
        view = ConfigView(hf, intermediate_size=hf.n_inner or 4 * hidden_size)
        return ArchConfig.from_hf(
            view, hidden_act=hf.activation_function, attention_bias=True, mlp_bias=True,
            extra=dict(layer_norm_eps=hf.layer_norm_epsilon,
                       scale_attn_weights=bool(hf.scale_attn_weights),
                       scale_attn_by_inverse_layer_idx=bool(hf.scale_attn_by_inverse_layer_idx)),
        )

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, hidden]: ln_f output on the last stage, else the residual stream."""
        return self.transformer(positions, meta, input_ids, hidden_states)

    def checkpoint_names(self, param_name: str) -> list[str]:
        if param_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return ["transformer.wte.weight"]
        return [param_name]
