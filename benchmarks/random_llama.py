"""The benchmarks' random-weight Llama: a Hugging Face-format directory (weights, config,
tokenizer) of a given size, the same weights for the same size (seed 0)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tokenizer_factory import MAX_VOCAB_SIZE, build_tokenizer


def build_model(directory: Path, hidden: int, layers: int, vocab: int,
                max_position_embeddings: int = 2048) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256),
                         max_position_embeddings=max_position_embeddings,
                         initializer_range=0.05, bos_token_id=0, eos_token_id=1, pad_token_id=3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    build_tokenizer(directory, vocab_size=min(vocab, MAX_VOCAB_SIZE))  # ids above: no text
    return directory
