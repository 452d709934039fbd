"""Llama, Mistral, Qwen2 and Qwen3: Mistral's sliding window and chained layer ranges.

Their equivalence with ``transformers`` is checked in ``test_architectures.py``.
"""

from __future__ import annotations

import pytest

from molink import LLM
from tests.model.arch_checks import greedy_tokens, hf_greedy, make_prompts
from tests.model.helpers import load_stages, prompt_logits
from tests.model.hf_configs import MISTRAL_WINDOW


def test_sliding_window_really_limits_attention(tiny_model_dir):
    """With window 16, a 40-token prompt's late logits differ from full attention."""
    (prompt,) = make_prompts(512, (40,))
    windowed = load_stages(tiny_model_dir("mistral-window"), [(0, None)])
    assert {layer.window for layer in windowed[0].attention_layers()} == {MISTRAL_WINDOW}
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
