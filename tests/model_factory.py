"""Tiny random-weight Hugging Face models, saved into a directory.

Each is saved with ``save_pretrained`` (plus a small trained tokenizer) and loaded back
through MoLink's real loading path. ``tests/model/tiny_configs.py`` holds the registry of
their configs (``build_model(name, directory)`` builds one of its entries).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tokenizer_factory import build_tokenizer

VOCAB_SIZE = 512


def build_model(name: str, directory: Path, **overrides) -> Path:
    """Save the tiny model ``name`` of ``tests/model/tiny_configs.py`` (and a tokenizer) into
    ``directory``; ``overrides`` change its ``transformers`` config. Returns the directory
    to load (remote-code entries put it below ``directory``, next to their reference)."""
    from tests.model.tiny_configs import TINY_MODELS

    return TINY_MODELS[name].build(directory, **overrides)


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
