"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): Llama with bias on the q/k/v projections."""

from __future__ import annotations

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLM


class Qwen2ForCausalLM(DecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        return ArchConfig.from_hf(hf, attention_bias=True)
