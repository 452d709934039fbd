"""Baichuan / Baichuan2 (``BaichuanForCausalLM``, ``trust_remote_code`` checkpoints), read natively.

The Llama decoder with three differences:

* q, k and v live in one checkpoint tensor, ``self_attn.W_pack`` (rows q | k | v);
* position information is rotary (7B sizes) or ALiBi (13B sizes). The original code picks
  ALiBi by model size (``num_hidden_layers == 40``); a ``position_embedding_type`` of
  ``"alibi"`` / ``"rope"`` in config.json, when present, decides instead;
* Baichuan2's ``NormHead``: every LM-head row is L2-normalised before use. The original
  detects Baichuan2 by its vocabulary (125696 tokens); a boolean ``norm_head`` in
  config.json, when present, decides instead. The rows are normalised in place once, on the
  first ``compute_logits`` (the original does the same on its first eval forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.alibi import alibi_slopes
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.decoder import DecoderLM
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.norm import RMSNorm
from molink.model.layers.rotary import RotaryEmbedding, apply_rotary

BAICHUAN2_VOCAB_SIZE = 125696
_ALIBI_NUM_LAYERS = 40  # Baichuan-13B / Baichuan2-13B
_POSITION_TYPES = ("rope", "alibi")


class BaichuanAttention(nn.Module):
    """W_pack (fused q|k|v), rotary or ALiBi, paged attention, o_proj."""

    def __init__(self, cfg: ArchConfig, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        hidden = cfg.hidden_size
        self.W_pack = nn.Linear(hidden, 3 * hidden, bias=False)  # noqa: N815 (checkpoint name)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.use_alibi = cfg.extra["use_alibi"]
        slopes = alibi_slopes(self.num_heads) if self.use_alibi else None
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim,
                                   scale=self.head_dim**-0.5, alibi_slopes=slopes)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (t.reshape(shape) for t in self.W_pack(x).chunk(3, dim=-1))  # [T, H, D] each
        if not self.use_alibi:
            # Baichuan2 rotates in fp32 and casts back (identical to in-dtype math in fp32).
            q = apply_rotary(q.float(), cos, sin).to(x.dtype)
            k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        return self.o_proj(self.attn(q, k, v, meta))


class BaichuanDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = BaichuanAttention(cfg, layer, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class BaichuanForCausalLM(DecoderLM):
    layer_cls = BaichuanDecoderLayer

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__(cfg, start_layer, end_layer)
        self._head_normalized = False

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        max_positions = (getattr(hf, "max_position_embeddings", None)
                         or getattr(hf, "model_max_length", None) or 4096)
        return ArchConfig.from_hf(
            hf,
            num_kv_heads=hf.num_attention_heads,  # W_pack holds full-size q, k and v
            max_position_embeddings=max_positions,
            rope_theta=10000.0,  # fixed in the original code
            rope_scaling=None,
            extra=dict(use_alibi=_uses_alibi(hf), norm_head=_uses_norm_head(hf)),
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32 (through the normalised head on Baichuan2)."""
        if self.cfg.extra["norm_head"] and not self._head_normalized:
            with torch.no_grad():
                weight = self.lm_head.weight
                weight.copy_(F.normalize(weight, dim=-1))  # [vocab, hidden], unit rows
            self._head_normalized = True
        return super().compute_logits(hidden_states)


def _uses_alibi(hf) -> bool:
    kind = getattr(hf, "position_embedding_type", None)
    if kind is None:
        return hf.num_hidden_layers == _ALIBI_NUM_LAYERS
    kind = str(kind).lower()
    if kind not in _POSITION_TYPES:
        raise ValueError(f"position_embedding_type {kind!r} is not supported for Baichuan "
                         f"(supported: {', '.join(_POSITION_TYPES)})")
    return kind == "alibi"


def _uses_norm_head(hf) -> bool:
    flag = getattr(hf, "norm_head", None)
    if flag is None:
        return hf.vocab_size == BAICHUAN2_VOCAB_SIZE
    return bool(flag)
