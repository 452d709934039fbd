"""StageModel: what every architecture's stage offers the runtime, written once."""

from __future__ import annotations

import torch
from torch import nn

from molink.model.layers.attention import PagedAttention


class StageModel(nn.Module):
    """Base of every model class: a causal LM restricted to one layer range.

    Subclasses build their modules (``lm_head`` on the last stage) and ``forward``.
    """

    def attention_layers(self) -> list[PagedAttention]:
        """This stage's attention modules in layer order (one KV cache each)."""
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        return self.lm_head(hidden_states).float()
