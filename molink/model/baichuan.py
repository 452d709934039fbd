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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.arch_config import ArchConfig, FamilyOptions
from molink.model.layers.cpu_linear import set_linear_weight
from molink.model.layers.decoder import (
    DecoderLayer,
    DecoderLM,
    DecoderParts,
    RotaryAttention,
    rms_norm,
)

BAICHUAN2_VOCAB_SIZE = 125696
_ALIBI_NUM_LAYERS = 40  # Baichuan-13B / Baichuan2-13B
_POSITION_TYPES = ("rope", "alibi")


@dataclass(frozen=True)
class BaichuanOptions(FamilyOptions):
    use_alibi: bool  # ALiBi instead of rotary (13B sizes)
    norm_head: bool  # Baichuan2's L2-normalised LM-head rows


class BaichuanAttention(RotaryAttention):
    """q, k and v in the checkpoint's one ``W_pack`` tensor (rows q | k | v)."""

    qkv_proj_name = "W_pack"


class BaichuanDecoderLayer(DecoderLayer):
    def build_attention(self, cfg: ArchConfig, layer: int, parts: DecoderParts) -> nn.Module:
        return BaichuanAttention(cfg, layer, parts)


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
            sliding_window=None,
            options=BaichuanOptions(use_alibi=_uses_alibi(hf), norm_head=_uses_norm_head(hf)),
        )

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        # Baichuan2 rotates in fp32 and casts back (identical to in-dtype math in fp32).
        return DecoderParts(norm=rms_norm(cfg), alibi=cfg.options.use_alibi, rope_in_fp32=True)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32 (through the normalised head on Baichuan2)."""
        if self.cfg.options.norm_head and not self._head_normalized:
            # [vocab, hidden], unit rows; the head may be packed (cpu_linear.TiledCpuLinear)
            set_linear_weight(self.lm_head, F.normalize(self.lm_head.weight, dim=-1))
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
