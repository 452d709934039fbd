"""StageModel: what every architecture's stage offers the runtime, written once."""

from __future__ import annotations

import torch
from torch import nn

from molink.model.layers.attention import PagedAttention


class StageModel(nn.Module):
    """Base of every model class: a causal LM restricted to one layer range.

    Subclasses call ``attach_body`` from their constructor and define ``forward``.
    """

    def attach_body(self, cfg, start_layer: int, end_layer: int, body_attr: str,
                    body: nn.Module, lm_head_bias: bool | None = False) -> None:
        """Hold ``body`` (the range's layers) under its checkpoint name, and an LM head on
        the last stage (``lm_head_bias=None``: the body owns the output layer itself)."""
        self.cfg = cfg
        self.start_layer, self.end_layer = start_layer, end_layer
        setattr(self, body_attr, body)
        self.is_first, self.is_last = body.is_first, body.is_last
        if self.is_last and lm_head_bias is not None:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=lm_head_bias)

    def attention_layers(self) -> list[PagedAttention]:
        """This stage's attention modules in layer order (one KV cache each)."""
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        return self.lm_head(hidden_states).float()
