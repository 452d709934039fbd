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

import functools
import logging
import math
from typing import Any

import torch

from molink.model.arch_config import ArchConfig
from molink.model.glm import rotary_dim_of
from molink.model.layers.norm import RMSNorm
from molink.model.layers.rotary import RotaryEmbedding
from molink.model.layers.variant_decoder import (
    DEFAULT_ROPE,
    DecoderParts,
    VariantDecoderLM,
)

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


def _longrope(hf, scaling: dict[str, Any]) -> dict[str, Any]:
    """The short-window LongRoPE settings: short factors, attention factor, original window."""
    original = (scaling.get("original_max_position_embeddings")
                or hf.original_max_position_embeddings)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:  # the paper's default, from the context extension ratio
        factor = scaling.get("factor") or hf.max_position_embeddings / original
        attention_factor = (1.0 if factor <= 1.0
                            else math.sqrt(1 + math.log(factor) / math.log(original)))
    return dict(short_factor=list(scaling["short_factor"]),
                attention_factor=float(attention_factor),
                original_max_position_embeddings=int(original))


class Phi3ForCausalLM(VariantDecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        arch = ArchConfig.from_hf(hf)
        extra = dict(rotary_dim=rotary_dim_of(hf, arch.head_dim))
        scaling = arch.rope_scaling
        if scaling is None or scaling["rope_type"] != "longrope":
            return ArchConfig.from_hf(hf, extra=extra)  # other rope types: RotaryEmbedding decides
        extra["longrope"] = longrope = _longrope(hf, scaling)
        window = longrope["original_max_position_embeddings"]
        if arch.max_position_embeddings > window:
            logger.warning(
                "%s: LongRoPE past the original %d-token window needs the KV cache re-encoded "
                "with long factors, which MoLink does not do; max_position_embeddings (the "
                "default max_model_len) is capped at %d", arch.architecture, window, window)
        return ArchConfig.from_hf(hf, rope_scaling=None, extra=extra,
                                  max_position_embeddings=min(arch.max_position_embeddings, window))

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        return DecoderParts(norm=functools.partial(RMSNorm, eps=cfg.rms_norm_eps),
                            fused_in_checkpoint=frozenset({"qkv_proj", "gate_up_proj"}))

    @staticmethod
    def rotaries(cfg: ArchConfig) -> dict[str, RotaryEmbedding]:
        longrope = cfg.extra.get("longrope")
        if longrope is None:
            return VariantDecoderLM.rotaries(cfg)
        return {DEFAULT_ROPE: ShortLongRopeEmbedding(
            cfg.extra["rotary_dim"], cfg.rope_theta, longrope["short_factor"],
            longrope["attention_factor"])}
