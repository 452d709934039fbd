"""Gemma, Gemma 2, Gemma 3 (text), Cohere, GLM-4 and Phi-3 equal Hugging Face ``transformers``.

Tiny random models (fp32, CPU). Norm weights and biases are randomised on top of the HF
initialisation (which sets them to 0 or 1), so a misplaced ``1 +``, a per-head q/k norm read
in the wrong order or a dropped bias changes the logits. Gemma 2 and Gemma 3 use a sliding
window (16) shorter than the longer prompts (23, 40, 64), and the tests assert that the
window really changes the logits.
"""

from __future__ import annotations

import pytest
import torch

from molink.model.loader import load_config
from tests.model.arch_checks import (NUM_NEW_TOKENS, SCENARIOS, check_greedy, check_layer_split,
                                     check_prompt_logits, hf_greedy, make_prompts)
from tests.model.helpers import load_stages, prompt_logits
from tests.model_factory import VOCAB_SIZE, build_model_from_config, load_hf

NUM_LAYERS = 4
WINDOW = 16


def _common(**overrides):
    values = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, bos_token_id=0, eos_token_id=1, pad_token_id=3,
    )
    values.update(overrides)
    return values


def gemma_config():
    from transformers import GemmaConfig

    # head_dim 32 != hidden / heads = 16
    return GemmaConfig(**_common(head_dim=32, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                                 tie_word_embeddings=True))


def gemma2_config():
    from transformers import Gemma2Config

    # layer_types default: sliding, full, sliding, full. Small caps so tanh really bends.
    return Gemma2Config(**_common(head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                  attn_logit_softcapping=5.0, final_logit_softcapping=8.0,
                                  rms_norm_eps=1e-6))


def gemma3_config():
    from transformers import Gemma3TextConfig

    rope = {"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1_000_000.0),
            "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)}
    return Gemma3TextConfig(**_common(
        head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=32, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                     "sliding_attention"],
        rope_parameters=rope, final_logit_softcapping=12.0))


def cohere_config():
    from transformers import CohereConfig

    return CohereConfig(**_common(use_qk_norm=True, logit_scale=0.5, attention_bias=True,
                                  layer_norm_eps=1e-5, tie_word_embeddings=True))


def glm_config():
    from transformers import GlmConfig

    return GlmConfig(**_common(head_dim=16, partial_rotary_factor=0.5, attention_bias=True,
                               rms_norm_eps=1e-6))


PHI3_WINDOW = 128  # original_max_position_embeddings: longer than prompt + output (64 + 32)


def phi3_config():
    from transformers import Phi3Config

    # Phi-4-mini style: partial rotary (12 of 16 dims) and LongRoPE.
    longrope = dict(rope_type="longrope", short_factor=[1.0, 1.3, 1.7, 2.2, 2.9, 3.5],
                    long_factor=[4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    return Phi3Config(**_common(partial_rotary_factor=0.75, rope_scaling=longrope,
                                original_max_position_embeddings=PHI3_WINDOW, rms_norm_eps=1e-5))


CONFIGS = {
    "gemma": gemma_config,
    "gemma2": gemma2_config,
    "gemma3": gemma3_config,
    "cohere": cohere_config,
    "glm": glm_config,
    "phi3": phi3_config,
}
ARCHS = list(CONFIGS)
SLIDING_ARCHS = ["gemma2", "gemma3"]


def _randomised(config):
    """The HF model with norm weights and biases moved off their 0 / 1 initial values."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_model_from_config(CONFIGS[name](), tmp_path_factory.mktemp(name),
                                                  model_class=_randomised)
        return cache[name]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_equal_transformers(arch, model_dir):
    check_prompt_logits(model_dir(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_split_into_layer_ranges_keeps_logits(arch, model_dir):
    check_layer_split(model_dir(arch), num_layers=NUM_LAYERS)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuous_batching_equals_transformers_generate(arch, scenario, model_dir):
    check_greedy(model_dir(arch), scenario)


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_sliding_window_shorter_than_prompt_changes_logits(arch, model_dir):
    directory = model_dir(arch)
    (model,) = stages = load_stages(directory, [(0, None)])
    layers = model.attention_layers()
    assert {layer.window for layer in layers} == {WINDOW, None}  # local and global layers
    (prompt,) = make_prompts(VOCAB_SIZE, (64,))
    windowed = prompt_logits(stages, prompt)
    for layer in layers:
        layer.window = None
    unwindowed = prompt_logits(stages, prompt)
    # Positions inside the window see the same keys either way; later ones must not.
    assert torch.equal(windowed[:WINDOW], unwindowed[:WINDOW])
    assert (windowed[WINDOW:] - unwindowed[WINDOW:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_transformers_generate_is_exact_under_a_sliding_window(arch, model_dir):
    """The reference itself: HF ``generate`` keeps only window - 1 keys in its sliding cache
    layers; its tokens must equal greedy decoding that recomputes the whole sequence."""
    directory = model_dir(arch)
    prompts, expected = hf_greedy(directory)
    hf_model = load_hf(directory)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokens = list(prompts[longest])
    with torch.no_grad():
        for _ in range(NUM_NEW_TOKENS):
            logits = hf_model(torch.tensor([tokens]), use_cache=False).logits[0, -1]
            tokens.append(int(logits.argmax()))
    assert tokens[len(prompts[longest]):] == expected[longest]


def test_phi3_longrope_uses_short_factors_inside_the_original_window(model_dir):
    directory = model_dir("phi3")
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

    config = Gemma2Config(**_common(head_dim=32, use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        Gemma2ForCausalLM.arch_config(config)


def test_gemma3_unsupported_global_rope_type_is_refused():
    from transformers import Gemma3TextConfig

    from molink.model.gemma3 import Gemma3ForCausalLM

    rope = {"full_attention": dict(rope_type="dynamic", factor=2.0, rope_theta=1_000_000.0),
            "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)}
    config = Gemma3TextConfig(**_common(head_dim=32, rope_parameters=rope))
    arch = Gemma3ForCausalLM.arch_config(config)
    with pytest.raises(ValueError, match="dynamic"), torch.device("meta"):
        Gemma3ForCausalLM(arch, 0, NUM_LAYERS)
