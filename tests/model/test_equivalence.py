"""Llama, Mistral, Qwen2 and Qwen3 equal Hugging Face ``transformers`` (fp32, CPU)."""

from __future__ import annotations

import pytest

from molink import LLM
from tests.model.arch_checks import (SCENARIOS, check_greedy, check_layer_split,
                                     check_prompt_logits, greedy_tokens, hf_greedy)

ARCHS = ["llama", "llama3", "mistral", "mistral-window", "qwen2", "qwen3"]


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


def test_sliding_window_really_limits_attention(tiny_model_dir):
    """With window 16, a 40-token prompt's late logits differ from full attention."""
    from tests.model.arch_checks import make_prompts
    from tests.model.helpers import load_stages, prompt_logits

    (prompt,) = make_prompts(512, (40,))
    windowed = load_stages(tiny_model_dir("mistral-window"), [(0, None)])
    assert {layer.window for layer in windowed[0].attention_layers()} == {16}
    full = load_stages(tiny_model_dir("mistral-window"), [(0, None)])
    for layer in full[0].attention_layers():
        layer.window = None
    a, b = prompt_logits(windowed, prompt), prompt_logits(full, prompt)
    assert (a[:16] - b[:16]).abs().max().item() == 0.0
    assert (a[16:] - b[16:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chained_layer_ranges_generate_the_same_tokens(arch, tiny_model_dir):
    directory = tiny_model_dir(arch)
    prompts, expected = hf_greedy(directory)
    llm = LLM(model=str(directory), dtype="float32", device="cpu", block_size=8,
              stage_layers=[(0, 1), (1, 3), (3, 4)])
    assert greedy_tokens(llm, prompts) == expected
