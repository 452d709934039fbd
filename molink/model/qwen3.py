"""Qwen3 (``Qwen3ForCausalLM``): Llama with RMSNorm on each head's q and k before RoPE."""

from __future__ import annotations

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLM


class Qwen3ForCausalLM(DecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        return ArchConfig.from_hf(hf, qk_norm=True)
