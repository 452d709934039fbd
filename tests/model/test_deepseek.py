"""DeepSeek-V2 and -V3: routing, stacked expert checkpoints, YaRN tables, refusals.

Their equivalence with ``transformers`` is checked in ``test_architectures.py`` on four tiny
models (``tiny_configs`` says which switch each one turns): the two main ones,
``deepseek-v2`` and ``deepseek-v3``, go through every check there and both checkpoint layouts
here; all four are checked here to route tokens like ``transformers``.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from molink.model.deepseek_v2 import DeepseekV2ForCausalLM
from molink.model.deepseek_v3 import DeepseekV3ForCausalLM
from molink.model.layers.deepseek_moe import DeepseekRouter
from molink.model.loader import load_config, load_model
from molink.runtime.kv_cache import allocate_kv_cache
from tests.model.arch_checks import make_prompts
from tests.model.helpers import load_stages, prompt_logits
from tests.model.hf_configs import NUM_EXPERTS, deepseek_v2_config, deepseek_v3_config
from tests.model.tiny_configs import TINY_MODELS, rewrite_checkpoint
from tests.model_factory import VOCAB_SIZE, load_hf

NUM_LAYERS = 4
NAMES = ["deepseek-v2", "deepseek-v2-greedy", "deepseek-v3", "deepseek-v3-plain"]
MAIN = ["deepseek-v2", "deepseek-v3"]  # one per architecture, with the most switches on


def _stack_experts(tensors: dict) -> dict:
    """Per-expert tensors -> ``experts.gate_up_proj`` [E, 2I, H] and ``.down_proj`` [E, H, I]."""
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    prefixes = {k.split(".experts.")[0] for k in tensors if ".mlp.experts." in k}
    for prefix in prefixes:
        def expert(e, part, prefix=prefix):
            return tensors[f"{prefix}.experts.{e}.{part}.weight"]

        out[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([expert(e, "gate_proj"), expert(e, "up_proj")]) for e in range(NUM_EXPERTS)])
        out[f"{prefix}.experts.down_proj"] = torch.stack(
            [expert(e, "down_proj") for e in range(NUM_EXPERTS)])
    return out


def test_arch_config_sizes_the_cache_for_decompressed_heads(tiny_model_dir):
    loaded = load_config(str(tiny_model_dir("deepseek-v3")))
    assert loaded.model_class is DeepseekV3ForCausalLM
    # one K/V head per query head, keys qk_nope + qk_rope wide (values are padded to it)
    assert loaded.arch.head_dim == 24 and loaded.arch.num_kv_heads == 4


@pytest.mark.parametrize("name", MAIN)
def test_stacked_expert_checkpoint_gives_the_same_logits(name, tiny_model_dir, tmp_path):
    per_expert = tiny_model_dir(name)
    stacked = tmp_path / "stacked"
    shutil.copytree(per_expert, stacked)
    rewrite_checkpoint(stacked, _stack_experts)
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


@pytest.mark.parametrize("name", NAMES)
def test_tokens_are_routed_like_transformers_to_several_experts(name, tiny_model_dir):
    directory = tiny_model_dir(name)
    config = TINY_MODELS[name].config()
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
        DeepseekV2ForCausalLM.arch_config(deepseek_v2_config(q_lora_rank=None,
                                                              topk_method="random"))
    quantized = deepseek_v3_config(q_lora_rank=None, n_group=1, topk_group=1)
    quantized.quantization_config = {"quant_method": "fp8"}
    with pytest.raises(ValueError, match="quantization_config"):
        DeepseekV3ForCausalLM.arch_config(quantized)


@pytest.mark.parametrize("rope", [
    # DeepSeek-V3 / R1 as released
    {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    # DeepSeek-V2 as released
    {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    {"factor": 4.0, "original_max_position_embeddings": 128, "mscale": 1.0,
     "mscale_all_dim": 0.8},
    {"factor": 8.0, "original_max_position_embeddings": 256},
])
def test_yarn_tables_and_softmax_scale_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale

    from molink.model.layers.mla import softmax_scale
    from molink.model.layers.rotary import RotaryEmbedding

    config = deepseek_v3_config(q_lora_rank=None, n_group=1, topk_group=1,
                                qk_rope_head_dim=64, max_position_embeddings=163840,
                                rope_parameters=dict(rope, rope_type="yarn", rope_theta=10000.0))
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    arch = DeepseekV3ForCausalLM.arch_config(config)
    rotary = RotaryEmbedding(64, arch.rope_theta, arch.rope_scaling)  # DeepSeek's rope dims
    assert torch.allclose(rotary._inv_freq, expected_inv_freq, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(expected_factor, rel=1e-12)
    qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    expected_scale = yarn_apply_mscale(config.rope_parameters, qk_dim**-0.5)
    assert softmax_scale(qk_dim, arch.rope_scaling) == pytest.approx(expected_scale, rel=1e-12)


def test_router_stays_float32_in_a_bfloat16_model(tiny_model_dir):
    directory = tiny_model_dir("deepseek-v3")
    model, _ = load_model(str(directory), 0, None, "bfloat16", torch.device("cpu"))
    routers = [m for m in model.modules() if isinstance(m, DeepseekRouter)]
    assert routers and all(p.dtype == torch.float32 for r in routers for p in r.parameters())
    assert model.lm_head.weight.dtype == torch.bfloat16
    allocate_kv_cache(model.attention_layers(), 16, 4, torch.bfloat16, torch.device("cpu"))
    (prompt,) = make_prompts(VOCAB_SIZE, (23,))
    logits = prompt_logits([model], prompt)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
