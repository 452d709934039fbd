"""Tiny random-weight Hugging Face models, built from ``transformers`` config classes.

Each is saved with ``save_pretrained`` (plus a small trained tokenizer) into a directory and
loaded back through MoLink's real loading path. ``initializer_range`` is raised above the
default so logits are spread out and greedy ties (which would make token-exact comparisons
flaky for reasons unrelated to correctness) do not happen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tokenizer_factory import build_tokenizer

VOCAB_SIZE = 512


def _common(**overrides):
    values = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        pad_token_id=3,
    )
    values.update(overrides)
    return values


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**_common(tie_word_embeddings=False, **overrides))


def llama3_config(**overrides):
    """Llama 3.x: rope_scaling of type llama3 and tied embeddings (as in Llama 3.2 1B/3B)."""
    from transformers import LlamaConfig

    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=64)
    return LlamaConfig(**_common(tie_word_embeddings=True, rope_parameters=rope, **overrides))


def mistral_config(**overrides):
    from transformers import MistralConfig

    return MistralConfig(**_common(sliding_window=4096, head_dim=32, **overrides))


def mistral_window_config(**overrides):
    """Mistral with a sliding window shorter than the longer test prompts (40, 64 tokens)."""
    from transformers import MistralConfig

    return MistralConfig(**_common(sliding_window=16, head_dim=32, **overrides))


def qwen2_config(**overrides):
    from transformers import Qwen2Config

    return Qwen2Config(**_common(tie_word_embeddings=True, **overrides))


def qwen3_config(**overrides):
    from transformers import Qwen3Config

    return Qwen3Config(**_common(head_dim=16, tie_word_embeddings=False, **overrides))


CONFIGS = {
    "llama": llama_config,
    "llama3": llama3_config,
    "mistral": mistral_config,
    "mistral-window": mistral_window_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
}


def build_model(name: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model named in CONFIGS (and a tokenizer) into ``directory``."""
    return build_model_from_config(CONFIGS[name](**overrides), directory, seed)


def build_model_from_config(config, directory: Path, seed: int = 0,
                            model_class=None) -> Path:
    """Save a random-weight model for a ``transformers`` config (and a tokenizer)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if model_class is None:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = model_class(config).to(torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    build_tokenizer(directory, vocab_size=min(VOCAB_SIZE, config.vocab_size))
    return directory


def load_hf(directory: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()
