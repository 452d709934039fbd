"""GLM-4 (``GlmForCausalLM``): Llama with partial, interleaved RoPE and a fused gate_up_proj.

Only the first ``partial_rotary_factor * head_dim`` dims of each head rotate (half, by
default), as interleaved pairs; q/k/v carry a bias, the output projection does not. The
checkpoint already stores the MLP's gate and up projections as one ``gate_up_proj``.
"""

from __future__ import annotations

import dataclasses

from molink.model.arch_config import ArchConfig
from molink.model.layers.decoder import DecoderLM, DecoderParts, rms_norm


def rotary_dim_of(hf, head_dim: int, default_factor: float = 1.0) -> int:
    """Rotated dims per head: ``partial_rotary_factor`` (v5 keeps it in ``rope_parameters``)."""
    params = getattr(hf, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
    return int(head_dim * (default_factor if factor is None else factor))


class GlmForCausalLM(DecoderLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        arch = ArchConfig.from_hf(hf)
        return dataclasses.replace(
            arch, rotary_dim=rotary_dim_of(hf, arch.head_dim, default_factor=0.5))

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        return DecoderParts(norm=rms_norm(cfg),
                            rope_interleaved=True, fused_in_checkpoint=frozenset({"gate_up_proj"}))
