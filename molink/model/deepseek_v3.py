"""DeepSeek-V3 / R1 (``DeepseekV3ForCausalLM``): DeepSeek-V2 with bias-corrected sigmoid routing.

The experts are chosen by ``noaux_tc`` (sigmoid scores plus ``e_score_correction_bias``,
group-limited top-k), weighted by the unbiased scores, optionally normalised; RoPE is
interleaved unless ``rope_interleave`` is false. Everything else is ``deepseek_v2.py``.
The multi-token-prediction layer of the hub checkpoints (layer ``num_hidden_layers``) is
not part of the causal LM and is never read.
"""

from __future__ import annotations

from molink.model.arch_config import ArchConfig
from molink.model.deepseek_v2 import DeepseekV2ForCausalLM, deepseek_arch_config


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    @staticmethod
    def arch_config(hf) -> ArchConfig:
        # transformers' V3 always routes by noaux_tc, whatever config.topk_method says.
        return deepseek_arch_config(
            hf, topk_method="noaux_tc", norm_topk_prob=bool(hf.norm_topk_prob),
            rope_interleave=bool(getattr(hf, "rope_interleave", True)))
