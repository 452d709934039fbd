"""Architecture registry: ``config.architectures[0]`` -> model class, imported lazily."""

from __future__ import annotations

import importlib

# architecture name -> (module under molink.model, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_architecture(architectures: list[str] | None) -> str:
    """The first supported name in ``config.architectures``, or a ValueError listing ours."""
    for name in architectures or []:
        if name in _MODELS:
            return name
    raise ValueError(
        f"architectures {architectures!r} in config.json is not supported; "
        f"supported: {', '.join(supported_architectures())}"
    )


def get_model_class(architecture: str) -> type:
    module_name, class_name = _MODELS[resolve_architecture([architecture])]
    module = importlib.import_module(f"molink.model.{module_name}")
    return getattr(module, class_name)
