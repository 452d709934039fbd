"""BLOOM (``BloomForCausalLM``): ALiBi attention, LayerNorm, GELU MLP, no position embeddings.

The first stage owns ``word_embeddings`` and the ``word_embeddings_layernorm`` applied right
after them; the last owns ``ln_f`` and the LM head (tied to the word embeddings unless the
config says otherwise).

``query_key_value`` is fused per head, not per projection: its output rows are laid out
``[head, (q | k | v), head_dim]``, so it is split after viewing it as ``[T, H, 3, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from molink.model.arch_config import ArchConfig, FamilyOptions
from molink.model.config_view import ConfigView
from molink.model.layers.alibi import alibi_slopes
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.block import ResidualBlock
from molink.model.layers.mlp import DenseMLP
from molink.model.layers.stage_model import BodyNames, StageBody, StageModel


@dataclass(frozen=True)
class BloomOptions(FamilyOptions):
    layer_norm_eps: float
    # Some checkpoints add the residual after the LayerNorm instead of before it.
    apply_residual_connection_post_layernorm: bool


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


def _block(cfg: ArchConfig, slopes: torch.Tensor) -> ResidualBlock:
    options: BloomOptions = cfg.options
    mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                   ("dense_h_to_4h", "dense_4h_to_h"))
    return ResidualBlock(lambda: nn.LayerNorm(cfg.hidden_size, eps=options.layer_norm_eps),
                         BloomAttention(cfg, slopes), mlp,
                         options.apply_residual_connection_post_layernorm)


class BloomBody(StageBody):
    """``transformer.*`` of the checkpoint: embeddings (+ their LayerNorm), blocks, ``ln_f``."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        eps = cfg.options.layer_norm_eps
        slopes = alibi_slopes(cfg.num_heads)  # [H], shared by every layer
        super().__init__(cfg, start_layer, end_layer, lambda i: _block(cfg, slopes),
                         lambda: nn.LayerNorm(cfg.hidden_size, eps=eps),
                         BodyNames("word_embeddings", "h", "ln_f"))
        if self.is_first:
            self.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Positions enter only through ALiBi, which reads them from ``meta``.
        return self.word_embeddings_layernorm(self.embedding(input_ids))  # [T, hidden]


class BloomForCausalLM(StageModel):
    body_cls = BloomBody
    body_attr = "transformer"

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        view = ConfigView(hf, intermediate_size=4 * hf.hidden_size)
        options = BloomOptions(layer_norm_eps=hf.layer_norm_epsilon,
                               apply_residual_connection_post_layernorm=bool(
                                   hf.apply_residual_connection_post_layernorm))
        return ArchConfig.from_hf(view, hidden_act="gelu_pytorch_tanh", attention_bias=True,
                                  mlp_bias=True, options=options)
