"""Llama, Mistral, Qwen2 and Qwen3 equal Hugging Face ``transformers`` (fp32, CPU)."""

from __future__ import annotations

import pytest

from molink import LLM
from tests.model.arch_checks import (SCENARIOS, check_greedy, check_layer_split,
                                     check_prompt_logits, greedy_tokens, hf_greedy)

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_equal_transformers(arch, tiny_model_dir):
    check_prompt_logits(tiny_model_dir(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_split_into_layer_ranges_keeps_logits(arch, tiny_model_dir):
    check_layer_split(tiny_model_dir(arch), num_layers=4)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuous_batching_equals_transformers_generate(arch, scenario, tiny_model_dir):
    check_greedy(tiny_model_dir(arch), scenario)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chained_layer_ranges_generate_the_same_tokens(arch, tiny_model_dir):
    directory = tiny_model_dir(arch)
    prompts, expected = hf_greedy(directory)
    llm = LLM(model=str(directory), dtype="float32", device="cpu", block_size=8,
              stage_layers=[(0, 1), (1, 3), (3, 4)])
    assert greedy_tokens(llm, prompts) == expected
