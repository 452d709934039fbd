"""DeepSeek-V2 and -V3 equal Hugging Face ``transformers`` (fp32, CPU).

Four tiny models cover the family's switches. The two main ones go through every check
(logits, layer splits, greedy in every scenario, both checkpoint layouts):

* ``v2``: direct ``q_proj`` (``q_lora_rank=None``), ``group_limited_greedy`` routing (top-3
  within one of two groups, so the group limit changes the choice), YaRN RoPE with
  ``mscale_all_dim`` (softmax scale), attention biases;
* ``v3``: low-rank q, ``noaux_tc`` grouped sigmoid routing with a non-zero
  ``e_score_correction_bias``, normalised weights, interleaved RoPE with YaRN whose
  ``mscale != mscale_all_dim`` (cos/sin attention factor).

Two variants flip the remaining switches and are checked on logits and routing:
``v2-greedy`` (low-rank q, greedy top-k, plain RoPE) and ``v3-plain`` (direct ``q_proj``,
one expert group, non-interleaved RoPE, unnormalised weights).

Each has a dense first layer, ``v_head_dim`` narrower than the key head (the cache pads
values), and 8 experts.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from molink.model.deepseek_v2 import DeepseekV2ForCausalLM
from molink.model.deepseek_v3 import DeepseekV3ForCausalLM
from molink.model.layers.deepseek_moe import DeepseekRouter
from molink.model.loader import load_config, load_model
from molink.runtime.kv_cache import allocate_kv_cache
from tests.model.arch_checks import (SCENARIOS, check_greedy, check_layer_split,
                                     check_prompt_logits, make_prompts)
from tests.model.helpers import load_stages, prompt_logits
from tests.model_factory import VOCAB_SIZE, build_model_from_config, load_hf

NUM_LAYERS = 4
NUM_EXPERTS = 8
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
            beta_fast=32, beta_slow=1)


def _common(**overrides):
    values = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=4,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        n_routed_experts=NUM_EXPERTS, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, max_position_embeddings=512, initializer_range=0.2,
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=3,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return values


def _v2(**overrides):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(**_common(**overrides))


def _v3(**overrides):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**_common(**overrides))


CONFIGS = {
    "v2": lambda: _v2(q_lora_rank=None, topk_method="group_limited_greedy", n_group=2,
                      topk_group=1, num_experts_per_tok=3, routed_scaling_factor=1.5,
                      attention_bias=True,
                      rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707)),
    "v2-greedy": lambda: _v2(q_lora_rank=24, topk_method="greedy", routed_scaling_factor=1.0),
    "v3": lambda: _v3(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
                      routed_scaling_factor=2.5, rope_interleave=True,
                      rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.8)),
    "v3-plain": lambda: _v3(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                            routed_scaling_factor=1.0, rope_interleave=False),
}
MAIN = ["v2", "v3"]  # one per architecture, with the most switches on: every check runs


def _rewrite_checkpoint(directory, transform) -> None:
    path = directory / "model.safetensors"
    tensors = transform(load_file(str(path)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def _randomize_constant_inits(tensors: dict) -> dict:
    """transformers initialises norms to one and biases to zero; make them matter too."""
    gen = torch.Generator().manual_seed(7)
    for name, tensor in tensors.items():
        noise = torch.randn(tensor.shape, generator=gen)
        if name.endswith("norm.weight"):
            tensors[name] = 1 + 0.3 * noise
        elif name.endswith(".bias"):
            tensors[name] = 0.1 * noise
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = 0.3 * noise
    return tensors


def _stack_experts(tensors: dict) -> dict:
    """Per-expert tensors -> ``experts.gate_up_proj`` [E, 2I, H] and ``.down_proj`` [E, H, I]."""
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    prefixes = {k.split(".experts.")[0] for k in tensors if ".mlp.experts." in k}
    for prefix in prefixes:
        def expert(e, part):
            return tensors[f"{prefix}.experts.{e}.{part}.weight"]

        out[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([expert(e, "gate_proj"), expert(e, "up_proj")]) for e in range(NUM_EXPERTS)])
        out[f"{prefix}.experts.down_proj"] = torch.stack(
            [expert(e, "down_proj") for e in range(NUM_EXPERTS)])
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            directory = build_model_from_config(CONFIGS[name](), tmp_path_factory.mktemp(name))
            _rewrite_checkpoint(directory, _randomize_constant_inits)
            cache[name] = directory
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_logits_equal_transformers(name, model_dir):
    check_prompt_logits(model_dir(name))


@pytest.mark.parametrize("name", MAIN)
def test_split_into_layer_ranges_keeps_logits(name, model_dir):
    check_layer_split(model_dir(name), num_layers=NUM_LAYERS)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", MAIN)
def test_greedy_continuous_batching_equals_transformers_generate(name, scenario, model_dir):
    check_greedy(model_dir(name), scenario)


def test_arch_config_sizes_the_cache_for_decompressed_heads(model_dir):
    loaded = load_config(str(model_dir("v3")))
    assert loaded.model_class is DeepseekV3ForCausalLM
    # one K/V head per query head, keys qk_nope + qk_rope wide (values are padded to it)
    assert loaded.arch.head_dim == 24 and loaded.arch.num_kv_heads == 4


@pytest.mark.parametrize("name", MAIN)
def test_stacked_expert_checkpoint_gives_the_same_logits(name, model_dir, tmp_path):
    per_expert = model_dir(name)
    stacked = tmp_path / "stacked"
    shutil.copytree(per_expert, stacked)
    _rewrite_checkpoint(stacked, _stack_experts)
    assert not any(".experts.0." in name for name in load_file(str(stacked / "model.safetensors")))
    (prompt,) = make_prompts(VOCAB_SIZE, (23,))
    expected = prompt_logits(load_stages(per_expert, [(0, None)]), prompt)
    for ranges in ([(0, None)], [(0, 2), (2, None)]):
        got = prompt_logits(load_stages(stacked, ranges), prompt)
        assert (got - expected).abs().max().item() <= 1e-6


def _record(routers) -> list[list[torch.Tensor]]:
    """Forward hooks appending each router call's expert ids [T, top_k] (its last output)."""
    calls = [[] for _ in routers]
    for i, router in enumerate(routers):
        router.register_forward_hook(lambda mod, args, out, i=i: calls[i].append(out[-1]))
    return calls


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tokens_are_routed_like_transformers_to_several_experts(name, model_dir):
    directory = model_dir(name)
    config = CONFIGS[name]()
    (prompt,) = make_prompts(VOCAB_SIZE, (40,))
    stages = load_stages(directory, [(0, None)])
    ours = _record([m for m in stages[0].modules() if isinstance(m, DeepseekRouter)])
    prompt_logits(stages, prompt)
    hf = load_hf(directory)
    theirs = _record([layer.mlp.gate for layer in hf.model.layers[config.first_k_dense_replace:]])
    with torch.no_grad():
        hf(torch.tensor([prompt]))
    assert len(ours) == NUM_LAYERS - config.first_k_dense_replace
    group_size = NUM_EXPERTS // (config.n_group or 1)
    for (our_ids,), (their_ids,) in zip(ours, theirs):
        assert torch.equal(our_ids.sort(dim=-1).values, their_ids.sort(dim=-1).values)
        assert our_ids.unique().numel() >= NUM_EXPERTS // 2  # several experts, not one
        if config.n_group and config.n_group > 1:
            groups = our_ids // group_size  # [T, top_k]
            assert all(row.unique().numel() <= config.topk_group for row in groups)
            assert groups.unique().numel() > config.topk_group  # the limit is per token


def test_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="topk_method"):
        DeepseekV2ForCausalLM.arch_config(_v2(q_lora_rank=None, topk_method="random"))
    quantized = _v3(q_lora_rank=None, n_group=1, topk_group=1)
    quantized.quantization_config = {"quant_method": "fp8"}
    with pytest.raises(ValueError, match="quantization_config"):
        DeepseekV3ForCausalLM.arch_config(quantized)


@pytest.mark.parametrize("rope", [
    # DeepSeek-V3 / R1 as released
    dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
         mscale=1.0, mscale_all_dim=1.0),
    # DeepSeek-V2 as released
    dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
         mscale=0.707, mscale_all_dim=0.707),
    dict(factor=4.0, original_max_position_embeddings=128, mscale=1.0, mscale_all_dim=0.8),
    dict(factor=8.0, original_max_position_embeddings=256),
])
def test_yarn_tables_and_softmax_scale_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale

    from molink.model.layers.mla import softmax_scale
    from molink.model.layers.rotary import RotaryEmbedding

    config = _v3(q_lora_rank=None, n_group=1, topk_group=1, qk_rope_head_dim=64,
                 max_position_embeddings=163840,
                 rope_parameters=dict(rope, rope_type="yarn", rope_theta=10000.0))
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    arch = DeepseekV3ForCausalLM.arch_config(config)
    rotary = RotaryEmbedding(64, arch.rope_theta, arch.rope_scaling)  # DeepSeek's rope dims
    assert torch.allclose(rotary._inv_freq, expected_inv_freq, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(expected_factor, rel=1e-12)
    qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    expected_scale = yarn_apply_mscale(config.rope_parameters, qk_dim**-0.5)
    assert softmax_scale(qk_dim, arch.rope_scaling) == pytest.approx(expected_scale, rel=1e-12)


def test_router_stays_float32_in_a_bfloat16_model(model_dir):
    model, _ = load_model(str(model_dir("v3")), 0, None, "bfloat16", torch.device("cpu"))
    routers = [m for m in model.modules() if isinstance(m, DeepseekRouter)]
    assert routers and all(p.dtype == torch.float32 for r in routers for p in r.parameters())
    assert model.lm_head.weight.dtype == torch.bfloat16
    allocate_kv_cache(model.attention_layers(), 16, 4, torch.bfloat16, torch.device("cpu"))
    (prompt,) = make_prompts(VOCAB_SIZE, (23,))
    logits = prompt_logits([model], prompt)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
