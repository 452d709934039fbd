"""Phi-3 / Phi-3.5 / Phi-4-mini (``Phi3ForCausalLM``): Llama with fused checkpoint projections.

The checkpoint stores ``qkv_proj`` and ``gate_up_proj`` already fused; RoPE may be partial
(``partial_rotary_factor``, Phi-4-mini) and may be LongRoPE (``longrope``, formerly ``su``).

LongRoPE has two frequency sets. Hugging Face uses ``short_factor`` while a sequence fits in
``original_max_position_embeddings`` and, once it grows past that, ``long_factor`` for the
whole sequence: generation throws the KV cache away at the crossing and re-encodes
everything with the long set. A paged engine keeps its KV, so only the short side is exact
here: for LongRoPE checkpoints ``max_position_embeddings`` is capped at the original window
(the engine's default ``max_model_len``), inside which our outputs equal Hugging Face's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from molink.model.arch_config import ArchConfig, FamilyOptions
from molink.model.glm import rotary_dim_of
from molink.model.layers.decoder import DEFAULT_ROPE, DecoderLM, DecoderParts, rms_norm
from molink.model.layers.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)


class ShortLongRopeEmbedding(RotaryEmbedding):
    """LongRoPE inside the original window: frequencies divided by ``short_factor``, and
    cos/sin multiplied by the attention factor."""

    def __init__(self, rotary_dim: int, theta: float, short_factor: list[float],
                 attention_factor: float) -> None:
        super().__init__(rotary_dim, theta)
        if len(short_factor) != rotary_dim // 2:
            raise ValueError(f"rope_scaling short_factor has {len(short_factor)} entries; "
                             f"expected rotary_dim / 2 = {rotary_dim // 2}")
        factors = torch.tensor(short_factor, dtype=torch.float32, device="cpu")
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float()
        exponents = exponents / rotary_dim
        self._inv_freq = 1.0 / (factors * theta**exponents)  # [rotary_dim // 2], CPU
        self.attention_scaling = attention_factor  # multiplies cos and sin


@dataclass(frozen=True)
class LongRopeOptions(FamilyOptions):
    """The short-window LongRoPE settings: short factors, attention factor, original window."""

    short_factor: tuple[float, ...]
    attention_factor: float
    original_max_position_embeddings: int


def _longrope(hf, scaling: dict[str, Any]) -> LongRopeOptions:
    """LongRoPE's short-window settings from a config's ``rope_scaling``."""
    original = (scaling.get("original_max_position_embeddings")
                or hf.original_max_position_embeddings)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:  # the paper's default, from the context extension ratio
        factor = scaling.get("factor") or hf.max_position_embeddings / original
        attention_factor = (1.0 if factor <= 1.0
                            else math.sqrt(1 + math.log(factor) / math.log(original)))
    return LongRopeOptions(short_factor=tuple(scaling["short_factor"]),
                           attention_factor=float(attention_factor),
                           original_max_position_embeddings=int(original))


class Phi3ForCausalLM(DecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        arch = ArchConfig.from_hf(hf)
        rotary_dim = rotary_dim_of(hf, arch.head_dim)
        scaling = arch.rope_scaling
        if scaling is None or scaling["rope_type"] != "longrope":
            # other rope types: RotaryEmbedding decides
            return ArchConfig.from_hf(hf, rotary_dim=rotary_dim)
        longrope = _longrope(hf, scaling)
        window = longrope.original_max_position_embeddings
        if arch.max_position_embeddings > window:
            logger.warning(
                "%s: LongRoPE past the original %d-token window needs the KV cache re-encoded "
                "with long factors, which MoLink does not do; max_position_embeddings (the "
                "default max_model_len) is capped at %d", arch.architecture, window, window)
        return ArchConfig.from_hf(hf, rope_scaling=None, rotary_dim=rotary_dim, options=longrope,
                                  max_position_embeddings=min(arch.max_position_embeddings, window))

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        return DecoderParts(norm=rms_norm(cfg),
                            fused_in_checkpoint=frozenset({"qkv_proj", "gate_up_proj"}))

    @staticmethod
    def rotaries(cfg: ArchConfig) -> dict[str, RotaryEmbedding]:
        longrope: LongRopeOptions | None = cfg.options
        if longrope is None:
            return DecoderLM.rotaries(cfg)
        return {DEFAULT_ROPE: ShortLongRopeEmbedding(
            cfg.rotary_dim, cfg.rope_theta, list(longrope.short_factor),
            longrope.attention_factor)}
