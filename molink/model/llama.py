"""Llama 2 / 3 / 3.x (``LlamaForCausalLM``): the reference decoder, as is."""

from __future__ import annotations

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLM


class LlamaForCausalLM(DecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        return ArchConfig.from_hf(hf)
