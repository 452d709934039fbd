"""Architecture registry: ``config.architectures[0]`` -> model class, imported lazily.

Each entry names the module under ``molink.model`` that implements the architecture and a
one-line note for the README's table (``scripts/gen_arch_table.py`` renders it).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import NamedTuple


class ModelEntry(NamedTuple):
    module: str  # module under molink.model
    class_name: str
    family: str  # "dense" | "moe" | "state-space" | "remote-code"
    notes: str


_MODELS: dict[str, ModelEntry] = {
    # dense
    "LlamaForCausalLM": ModelEntry("llama", "LlamaForCausalLM", "dense",
                                   "Llama 2/3/3.x; GQA; rope_scaling llama3/linear"),
    "MistralForCausalLM": ModelEntry("mistral", "MistralForCausalLM", "dense",
                                     "sliding-window attention"),
    "Qwen2ForCausalLM": ModelEntry("qwen2", "Qwen2ForCausalLM", "dense",
                                   "Qwen2/2.5; q/k/v bias"),
    "Qwen3ForCausalLM": ModelEntry("qwen3", "Qwen3ForCausalLM", "dense", "q/k RMSNorm"),
    "GPT2LMHeadModel": ModelEntry("gpt2", "GPT2LMHeadModel", "dense",
                                  "learned positions, LayerNorm, GELU MLP"),
    "BloomForCausalLM": ModelEntry("bloom", "BloomForCausalLM", "dense", "ALiBi"),
    "FalconForCausalLM": ModelEntry("falcon", "FalconForCausalLM", "dense",
                                    "parallel attention and new decoder layouts"),
    "GemmaForCausalLM": ModelEntry("gemma", "GemmaForCausalLM", "dense", "(1+w) RMSNorm, GeGLU"),
    "Gemma2ForCausalLM": ModelEntry("gemma2", "Gemma2ForCausalLM", "dense",
                                    "soft-capping, sliding window on alternate layers"),
    "Gemma3ForCausalLM": ModelEntry("gemma3", "Gemma3ForCausalLM", "dense",
                                    "text; local/global layers, q/k norm"),
    "PhiForCausalLM": ModelEntry("phi", "PhiForCausalLM", "dense",
                                 "partial rotary, parallel block"),
    "Phi3ForCausalLM": ModelEntry("phi3", "Phi3ForCausalLM", "dense", "fused qkv / gate_up"),
    "CohereForCausalLM": ModelEntry("cohere", "CohereForCausalLM", "dense",
                                    "LayerNorm, parallel block, logit scale"),
    "GlmForCausalLM": ModelEntry("glm", "GlmForCausalLM", "dense", "GLM-4; partial rotary"),
    # mixture of experts
    "MixtralForCausalLM": ModelEntry("mixtral", "MixtralForCausalLM", "moe", "top-2 of 8 experts"),
    "Qwen2MoeForCausalLM": ModelEntry("qwen2_moe", "Qwen2MoeForCausalLM", "moe", "shared expert"),
    "Qwen3MoeForCausalLM": ModelEntry("qwen3_moe", "Qwen3MoeForCausalLM", "moe", "q/k norm"),
    "DeepseekV2ForCausalLM": ModelEntry("deepseek_v2", "DeepseekV2ForCausalLM", "moe",
                                        "multi-head latent attention, grouped top-k"),
    "DeepseekV3ForCausalLM": ModelEntry("deepseek_v3", "DeepseekV3ForCausalLM", "moe",
                                        "multi-head latent attention, grouped top-k"),
    "GptOssForCausalLM": ModelEntry("gpt_oss", "GptOssForCausalLM", "moe",
                                    "attention sinks, alternating sliding window"),
    # state space
    "MambaForCausalLM": ModelEntry("mamba", "MambaForCausalLM", "state-space",
                                   "per-request state instead of KV"),
    # checkpoints that need trust_remote_code in transformers (read natively here)
    "BaichuanForCausalLM": ModelEntry("baichuan", "BaichuanForCausalLM", "remote-code",
                                      "Baichuan/Baichuan2; W_pack, NormHead, ALiBi (13B)"),
    "BaiChuanForCausalLM": ModelEntry("baichuan", "BaichuanForCausalLM", "remote-code",
                                      "Baichuan-7B (v1 spelling)"),
    "ChatGLMModel": ModelEntry("chatglm", "ChatGLMForConditionalGeneration", "remote-code",
                               "ChatGLM2/3"),
    "ChatGLMForConditionalGeneration": ModelEntry("chatglm", "ChatGLMForConditionalGeneration",
                                                  "remote-code", "ChatGLM2/3"),
    "QWenLMHeadModel": ModelEntry("qwen", "QWenLMHeadModel", "remote-code", "Qwen 1"),
}


def _available(entry: ModelEntry) -> bool:
    return importlib.util.find_spec(f"molink.model.{entry.module}") is not None


def registered_models() -> dict[str, ModelEntry]:
    """Implemented architectures, by name."""
    return {name: entry for name, entry in sorted(_MODELS.items()) if _available(entry)}


def resolve_architecture(architectures: list[str] | None) -> str:
    """The first supported name in ``config.architectures``, or a ValueError listing ours."""
    supported = registered_models()
    for name in architectures or []:
        if isinstance(name, str) and name in supported:
            return name
    raise ValueError(
        f"architectures {architectures!r} in config.json is not supported; "
        f"supported: {', '.join(supported)}"
    )


def get_model_class(architecture: str) -> type:
    entry = _MODELS[resolve_architecture([architecture])]
    module = importlib.import_module(f"molink.model.{entry.module}")
    return getattr(module, entry.class_name)
