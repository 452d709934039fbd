"""Mistral (``MistralForCausalLM``): Llama with sliding-window attention on every layer."""

from __future__ import annotations

from molink.model.arch_config import FULL_ATTENTION, SLIDING_ATTENTION, ArchConfig
from molink.model.layers.decoder import DecoderLM


class MistralForCausalLM(DecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        window = getattr(hf, "sliding_window", None)
        kind = FULL_ATTENTION if window is None else SLIDING_ATTENTION
        return ArchConfig.from_hf(hf, layer_types=(kind,) * hf.num_hidden_layers)
