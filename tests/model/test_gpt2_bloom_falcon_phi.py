"""GPT-2, BLOOM, Falcon and Phi equal Hugging Face ``transformers`` (fp32, CPU).

Each variant is a tiny random model built from the family's ``transformers`` config class
and run through the shared checks (prompt logits, layer splits, greedy continuous batching
in every scenario). Falcon is tested in each of its block layouts: Falcon-7B (parallel
attention, multi-query), Falcon-40B/180B (new decoder architecture, grouped kv, ln_attn +
ln_mlp) and Falcon-RW (ALiBi, sequential block, per-head interleaved qkv).
"""

from __future__ import annotations

import pytest
import torch

from molink.model.layers.alibi import alibi_slopes
from molink.model.layers.rotary import RotaryEmbedding, apply_partial_rotary, apply_rotary
from molink.model.loader import load_config
from tests.model.arch_checks import (SCENARIOS, check_greedy, check_layer_split,
                                     check_prompt_logits)
from tests.model_factory import VOCAB_SIZE, build_model_from_config

NUM_LAYERS = 3
_TOKENS = dict(vocab_size=VOCAB_SIZE, bos_token_id=0, eos_token_id=1, pad_token_id=3)


def gpt2_config(**overrides):
    from transformers import GPT2Config

    return GPT2Config(**dict(dict(n_embd=64, n_layer=NUM_LAYERS, n_head=4, n_inner=128,
                                  n_positions=256, initializer_range=0.2, **_TOKENS),
                             **overrides))


def bloom_config(**overrides):
    from transformers import BloomConfig

    # 6 heads: not a power of two, so the "extra" ALiBi slopes are exercised too.
    return BloomConfig(**dict(dict(hidden_size=72, n_layer=NUM_LAYERS, n_head=6,
                                   initializer_range=0.2, **_TOKENS), **overrides))


def falcon7b_config(**overrides):
    """Falcon-7B layout: parallel attention + MLP, multi-query, one LayerNorm, rotary."""
    from transformers import FalconConfig

    return FalconConfig(**dict(dict(hidden_size=64, num_hidden_layers=NUM_LAYERS,
                                    num_attention_heads=4, ffn_hidden_size=128, multi_query=True,
                                    parallel_attn=True, new_decoder_architecture=False,
                                    alibi=False, bias=False, initializer_range=0.2, **_TOKENS),
                               **overrides))


def falcon40b_config(**overrides):
    """Falcon-40B/180B layout: new decoder architecture, grouped kv, ln_attn + ln_mlp, rotary."""
    from transformers import FalconConfig

    return FalconConfig(**dict(dict(hidden_size=64, num_hidden_layers=NUM_LAYERS,
                                    num_attention_heads=8, num_kv_heads=2, ffn_hidden_size=128,
                                    new_decoder_architecture=True, parallel_attn=True,
                                    alibi=False, bias=False, initializer_range=0.2,
                                    tie_word_embeddings=False, **_TOKENS), **overrides))


def falcon_rw_config(**overrides):
    """Falcon-RW layout: sequential block, per-head qkv, ALiBi, bias."""
    from transformers import FalconConfig

    return FalconConfig(**dict(dict(hidden_size=64, num_hidden_layers=NUM_LAYERS,
                                    num_attention_heads=4, ffn_hidden_size=128, multi_query=False,
                                    parallel_attn=False, new_decoder_architecture=False,
                                    alibi=True, bias=True, initializer_range=0.2, **_TOKENS),
                               **overrides))


def phi_config(**overrides):
    from transformers import PhiConfig

    rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)
    return PhiConfig(**dict(dict(hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256,
                                 rope_parameters=rope, qk_layernorm=True, initializer_range=0.2,
                                 **_TOKENS), **overrides))


CONFIGS = {
    "gpt2": gpt2_config,
    "bloom": bloom_config,
    "falcon-7b": falcon7b_config,
    "falcon-40b": falcon40b_config,
    "falcon-rw": falcon_rw_config,
    "phi": phi_config,
}
ARCHS = list(CONFIGS)

# Less common settings of each family, checked on prompt logits only (keeps the suite fast).
VARIANTS = {
    "gpt2-inverse-layer-scale": lambda: gpt2_config(scale_attn_by_inverse_layer_idx=True,
                                                    n_inner=None),
    "bloom-residual-after-norm": lambda: bloom_config(
        apply_residual_connection_post_layernorm=True),
    "falcon-40b-one-norm": lambda: falcon40b_config(num_ln_in_parallel_attn=1),
    "falcon-7b-bias-untied": lambda: falcon7b_config(bias=True, tie_word_embeddings=False),
    "phi-no-qk-norm-tied": lambda: phi_config(
        qk_layernorm=False, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=500.0, partial_rotary_factor=0.4)),
}
CONFIGS.update(VARIANTS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_model_from_config(CONFIGS[name](), tmp_path_factory.mktemp(name))
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


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_prompt_logits_equal_transformers(variant, model_dir):
    check_prompt_logits(model_dir(variant), lengths=(23,))


@pytest.mark.parametrize("arch, expected", [
    ("falcon-7b", dict(qkv_layout="multi_query", num_kv_heads=1, parallel_attn=True, alibi=False)),
    ("falcon-40b", dict(qkv_layout="grouped", num_kv_heads=2, parallel_attn=True, alibi=False,
                        num_ln_in_parallel_attn=2)),
    ("falcon-rw", dict(qkv_layout="per_head", num_kv_heads=4, parallel_attn=False, alibi=True)),
])
def test_falcon_variants_cover_each_layout(arch, expected, model_dir):
    """The Falcon configs above really select the layouts they are meant to test."""
    arch_config = load_config(str(model_dir(arch))).arch
    seen = dict(arch_config.extra, num_kv_heads=arch_config.num_kv_heads)
    assert {key: seen[key] for key in expected} == expected


@pytest.mark.parametrize("num_heads", [1, 4, 6, 8, 12, 16, 24, 112])
def test_alibi_slopes_equal_transformers(num_heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    expected = _get_alibi_slopes(num_heads, torch.device("cpu"))
    assert torch.equal(alibi_slopes(num_heads), expected)


def test_partial_rotary_rotates_only_the_leading_dims():
    positions = torch.arange(7)
    x = torch.randn(7, 3, 16)  # [T, heads, head_dim]
    full_cos, full_sin = RotaryEmbedding(16, 10000.0).cos_sin(positions)
    full = apply_partial_rotary(x, full_cos, full_sin)
    assert torch.equal(full, apply_rotary(x, full_cos, full_sin))
    cos, sin = RotaryEmbedding(6, 10000.0).cos_sin(positions)  # [T, 1, 6]
    out = apply_partial_rotary(x, cos, sin)
    assert torch.equal(out[..., 6:], x[..., 6:])
    assert torch.equal(out[..., :6], apply_rotary(x[..., :6], cos, sin))
    assert not torch.allclose(out[1:, :, :6], x[1:, :, :6])  # position > 0 really rotates
