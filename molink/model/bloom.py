"""BLOOM (``BloomForCausalLM``): ALiBi attention, LayerNorm, GELU MLP, no position embeddings.

The first stage owns ``word_embeddings`` and the ``word_embeddings_layernorm`` applied right
after them; the last owns ``ln_f`` and the LM head (tied to the word embeddings unless the
config says otherwise).

``query_key_value`` is fused per head, not per projection: its output rows are laid out
``[head, (q | k | v), head_dim]``, so it is split after viewing it as ``[T, H, 3, D]``.
"""

from __future__ import annotations

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.config_view import ConfigView
from molink.model.layers.alibi import alibi_slopes
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.mlp import get_activation
from molink.model.layers.stage_model import StageModel


class BloomAttention(nn.Module):
    def __init__(self, cfg: ArchConfig, slopes: torch.Tensor) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim,
                                   scale=self.head_dim**-0.5, alibi_slopes=slopes)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.query_key_value(x).view(num_tokens, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(2)  # each [T, H, D]
        return self.dense(self.attn(q, k, v, meta))


class BloomMLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, cfg: ArchConfig, slopes: torch.Tensor) -> None:
        super().__init__()
        eps = cfg.extra["layer_norm_eps"]
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.self_attention = BloomAttention(cfg, slopes)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.mlp = BloomMLP(cfg)
        # Some checkpoints add the residual after the LayerNorm instead of before it.
        self.residual_after_norm = cfg.extra["apply_residual_connection_post_layernorm"]

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        normed = self.input_layernorm(h)
        h = (normed if self.residual_after_norm else h) + self.self_attention(normed, meta)
        normed = self.post_attention_layernorm(h)
        return (normed if self.residual_after_norm else h) + self.mlp(normed)


class BloomBody(nn.Module):
    """``transformer.*`` of the checkpoint: embeddings (+ their LayerNorm), blocks, ``ln_f``."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.is_first = start_layer == 0
        self.is_last = end_layer == cfg.num_layers
        eps = cfg.extra["layer_norm_eps"]
        if self.is_first:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        slopes = alibi_slopes(cfg.num_heads)  # [H], shared by every layer
        self.h = nn.ModuleDict({str(i): BloomBlock(cfg, slopes)
                                for i in range(start_layer, end_layer)})
        if self.is_last:
            self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=eps)

    def forward(self, meta: AttentionMetadata, input_ids: torch.Tensor | None,
                hidden_states: torch.Tensor | None) -> torch.Tensor:
        if self.is_first:
            h = self.word_embeddings_layernorm(self.word_embeddings(input_ids))  # [T, hidden]
        else:
            h = hidden_states
        for block in self.h.values():
            h = block(h, meta)
        return self.ln_f(h) if self.is_last else h


class BloomForCausalLM(StageModel):
    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.attach_body(cfg, start_layer, end_layer, "transformer",
                         BloomBody(cfg, start_layer, end_layer), lm_head_bias=False)

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        view = ConfigView(hf, intermediate_size=4 * hf.hidden_size)
        return ArchConfig.from_hf(
            view, hidden_act="gelu_pytorch_tanh", attention_bias=True, mlp_bias=True,
            extra=dict(layer_norm_eps=hf.layer_norm_epsilon,
                       apply_residual_connection_post_layernorm=bool(
                           hf.apply_residual_connection_post_layernorm)),
        )

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, hidden]: ln_f output on the last stage, else the residual stream.

        Positions enter only through ALiBi, which reads them from ``meta``.
        """
        return self.transformer(meta, input_ids, hidden_states)

    def checkpoint_names(self, param_name: str) -> list[str]:
        if param_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return ["transformer.word_embeddings.weight"]
        return [param_name]
