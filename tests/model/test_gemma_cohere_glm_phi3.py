"""Gemma, Gemma 2, Gemma 3 (text), Cohere, GLM-4 and Phi-3: sliding windows, LongRoPE, refusals.

Their equivalence with ``transformers`` is checked in ``test_architectures.py`` (norm weights
and biases randomised, see ``tiny_configs``). Gemma 2 and Gemma 3 use a sliding window (16)
shorter than the longer prompts (23, 40, 64), and the tests here assert that the window
really changes the logits.
"""

from __future__ import annotations

import pytest
import torch

from molink.model.loader import load_config
from tests.model.arch_checks import NUM_NEW_TOKENS, hf_greedy, make_prompts
from tests.model.helpers import load_stages, prompt_logits
from tests.model.hf_configs import GEMMA_WINDOW, PHI3_WINDOW, common
from tests.model_factory import VOCAB_SIZE, load_hf

NUM_LAYERS = 4
SLIDING_ARCHS = ["gemma2", "gemma3"]


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_sliding_window_shorter_than_prompt_changes_logits(arch, tiny_model_dir):
    directory = tiny_model_dir(arch)
    (model,) = stages = load_stages(directory, [(0, None)])
    layers = model.attention_layers()
    assert {layer.window for layer in layers} == {GEMMA_WINDOW, None}  # local and global layers
    (prompt,) = make_prompts(VOCAB_SIZE, (64,))
    windowed = prompt_logits(stages, prompt)
    for layer in layers:
        layer.window = None
    unwindowed = prompt_logits(stages, prompt)
    # Positions inside the window see the same keys either way; later ones must not.
    assert torch.equal(windowed[:GEMMA_WINDOW], unwindowed[:GEMMA_WINDOW])
    assert (windowed[GEMMA_WINDOW:] - unwindowed[GEMMA_WINDOW:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_transformers_generate_is_exact_under_a_sliding_window(arch, tiny_model_dir):
    """The reference itself: HF ``generate`` keeps only window - 1 keys in its sliding cache
    layers; its tokens must equal greedy decoding that recomputes the whole sequence."""
    directory = tiny_model_dir(arch)
    prompts, expected = hf_greedy(directory)
    hf_model = load_hf(directory)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokens = list(prompts[longest])
    with torch.no_grad():
        for _ in range(NUM_NEW_TOKENS):
            logits = hf_model(torch.tensor([tokens]), use_cache=False).logits[0, -1]
            tokens.append(int(logits.argmax()))
    assert tokens[len(prompts[longest]):] == expected[longest]


def test_phi3_longrope_uses_short_factors_inside_the_original_window(tiny_model_dir):
    directory = tiny_model_dir("phi3")
    arch = load_config(str(directory)).arch
    assert arch.max_position_embeddings == PHI3_WINDOW  # capped: the long side is not served
    hf_rotary = load_hf(directory).model.rotary_emb
    (model,) = load_stages(directory, [(0, None)])
    positions = torch.arange(PHI3_WINDOW)
    cos, sin = model.model.rotaries["rope"].cos_sin(positions)
    x = torch.zeros(1, PHI3_WINDOW, 1)
    hf_cos, hf_sin = hf_rotary(x, positions[None])
    assert hf_rotary.attention_scaling > 1.0  # the attention factor is exercised
    torch.testing.assert_close(cos[:, 0], hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], hf_sin[0], rtol=0, atol=1e-6)


def test_gemma2_bidirectional_config_is_refused():
    from transformers import Gemma2Config

    from molink.model.gemma2 import Gemma2ForCausalLM

    config = Gemma2Config(**common(head_dim=32, use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        Gemma2ForCausalLM.arch_config(config)


def test_gemma3_unsupported_global_rope_type_is_refused():
    from transformers import Gemma3TextConfig

    from molink.model.gemma3 import Gemma3ForCausalLM

    rope = {"full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    config = Gemma3TextConfig(**common(head_dim=32, rope_parameters=rope))
    arch = Gemma3ForCausalLM.arch_config(config)
    with pytest.raises(ValueError, match="dynamic"), torch.device("meta"):
        Gemma3ForCausalLM(arch, 0, NUM_LAYERS)
