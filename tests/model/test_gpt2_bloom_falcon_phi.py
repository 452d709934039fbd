"""GPT-2, BLOOM, Falcon and Phi: Falcon's block layouts, ALiBi slopes, partial rotary.

Their equivalence with ``transformers`` is checked in ``test_architectures.py``, Falcon in
each of its block layouts: Falcon-7B (parallel attention, multi-query), Falcon-40B/180B (new
decoder architecture, grouped kv, ln_attn + ln_mlp) and Falcon-RW (ALiBi, sequential block,
per-head interleaved qkv).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from molink.model.layers.alibi import alibi_slopes
from molink.model.layers.rotary import RotaryEmbedding, apply_partial_rotary, apply_rotary
from molink.model.loader import load_config


@pytest.mark.parametrize("arch, expected", [
    ("falcon-7b", {"qkv_layout": "multi_query", "num_kv_heads": 1, "parallel_attn": True,
                   "alibi": False}),
    ("falcon-40b", {"qkv_layout": "grouped", "num_kv_heads": 2, "parallel_attn": True,
                    "alibi": False, "num_ln_in_parallel_attn": 2}),
    ("falcon-rw", {"qkv_layout": "per_head", "num_kv_heads": 4, "parallel_attn": False,
                   "alibi": True}),
])
def test_falcon_variants_cover_each_layout(arch, expected, tiny_model_dir):
    """The Falcon configs of ``hf_configs`` really select the layouts they are meant to test."""
    arch_config = load_config(str(tiny_model_dir(arch))).arch
    seen = dict(dataclasses.asdict(arch_config.options), num_kv_heads=arch_config.num_kv_heads)
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
