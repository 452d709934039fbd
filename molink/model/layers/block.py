"""The BLOOM / ChatGLM block: pre-norm attention, then a pre-norm MLP, each residual.

With ``apply_residual_connection_post_layernorm`` the residual added back is the normed
input rather than the input itself::

    x = n1(h);  h = (x if post else h) + attn(x)
    x = n2(h);  h = (x if post else h) + mlp(x)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """Checkpoint names: ``input_layernorm``, ``self_attention``, ``post_attention_layernorm``,
    ``mlp``. Called as ``block(h, *inputs)``; the attention gets ``(normed, *inputs)``."""

    def __init__(self, norm: Callable[[], nn.Module], attention: nn.Module, mlp: nn.Module,
                 residual_after_norm: bool) -> None:
        super().__init__()
        self.input_layernorm = norm()
        self.self_attention = attention
        self.post_attention_layernorm = norm()
        self.mlp = mlp
        self.residual_after_norm = residual_after_norm

    def forward(self, h: torch.Tensor, *inputs) -> torch.Tensor:
        normed = self.input_layernorm(h)
        h = (normed if self.residual_after_norm else h) + self.self_attention(normed, *inputs)
        normed = self.post_attention_layernorm(h)
        return (normed if self.residual_after_norm else h) + self.mlp(normed)
