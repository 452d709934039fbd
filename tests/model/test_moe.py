"""Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss equal Hugging Face ``transformers`` (fp32, CPU).

Beyond the shared checks: every sparse layer routes the test prompt to several experts, and
to the same experts as ``transformers``; checkpoints whose experts are stored as fused 3-D
tensors give the same logits as the per-expert layout ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from molink.model.layers.moe import TopKRouter
from tests.model.arch_checks import (SCENARIOS, check_greedy, check_layer_split,
                                     check_prompt_logits, make_prompts)
from tests.model.helpers import load_stages, prompt_logits
from tests.model_factory import VOCAB_SIZE, load_hf
from tests.tokenizer_factory import build_tokenizer

NUM_LAYERS = 3
NUM_EXPERTS = 8
GPT_OSS_WINDOW = 12  # shorter than the longest test prompts (40, 64 tokens)


def _common(**overrides) -> dict:
    values = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        pad_token_id=3, tie_word_embeddings=False,
    )
    values.update(overrides)
    return values


def mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(**_common(intermediate_size=48, num_local_experts=NUM_EXPERTS,
                                   num_experts_per_tok=2))


def qwen2_moe_config():
    """Layer 1 is dense (``mlp_only_layers``); top-k weights are not renormalised."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**_common(intermediate_size=96, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48, num_experts=NUM_EXPERTS,
                                    num_experts_per_tok=2, norm_topk_prob=False,
                                    mlp_only_layers=[1]))


def qwen3_moe_config():
    """Layers 1 and 3 sparse (``decoder_sparse_step=2``); top-k weights renormalised."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_common(num_hidden_layers=4, head_dim=16, intermediate_size=96,
                                    moe_intermediate_size=32, num_experts=NUM_EXPERTS,
                                    num_experts_per_tok=2, norm_topk_prob=True,
                                    decoder_sparse_step=2))


def gpt_oss_config():
    """Alternating sliding (window 12) / full layers, YaRN RoPE, 8 experts, top-2."""
    from transformers import GptOssConfig

    rope = dict(rope_type="yarn", rope_theta=150000.0, factor=8.0, beta_fast=32.0,
                beta_slow=1.0, truncate=False, original_max_position_embeddings=64)
    return GptOssConfig(**_common(intermediate_size=32, head_dim=16,
                                  num_local_experts=NUM_EXPERTS, num_experts_per_tok=2,
                                  sliding_window=GPT_OSS_WINDOW, rope_parameters=rope))


CONFIGS = {
    "mixtral": mixtral_config,
    "qwen2_moe": qwen2_moe_config,
    "qwen3_moe": qwen3_moe_config,
    "gpt_oss": gpt_oss_config,
}
ARCHS = list(CONFIGS)


def _build(config, directory):
    """Save a random model; biases (zero at init) and sinks get random values too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                param.normal_(0.0, 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    build_tokenizer(directory, vocab_size=VOCAB_SIZE)
    return directory


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = _build(CONFIGS[arch](), tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


def _num_layers(arch: str) -> int:
    return CONFIGS[arch]().num_hidden_layers


def _sparse_layers(arch: str) -> list[int]:
    config = CONFIGS[arch]()
    if arch in ("qwen2_moe", "qwen3_moe"):
        return [i for i in range(config.num_hidden_layers)
                if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0]
    return list(range(config.num_hidden_layers))


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_equal_transformers(arch, moe_dir):
    check_prompt_logits(moe_dir(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_split_into_layer_ranges_keeps_logits(arch, moe_dir):
    check_layer_split(moe_dir(arch), num_layers=_num_layers(arch))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuous_batching_equals_transformers_generate(arch, scenario, moe_dir):
    # The scenarios that do not size the KV cache get one far larger than the prompts need
    # (no preemption) instead of the CPU default of 2 GiB, which takes seconds to zero.
    options = {} if "num_kv_blocks" in SCENARIOS[scenario] else dict(num_kv_blocks=512)
    check_greedy(moe_dir(arch), scenario, **options)


def _record_routing(model, router_type) -> tuple[dict[int, list[torch.Tensor]], list]:
    """Hooks on every router of ``model``: layer -> expert ids [T, k] of each call."""
    chosen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, router_type):
            layer = int(name.split("layers.")[1].split(".")[0])

            def hook(_module, _inputs, output, layer=layer):
                ids = output[0] if router_type is TopKRouter else output[2]
                chosen.setdefault(layer, []).append(ids.reshape(-1, ids.shape[-1]).clone())

            handles.append(module.register_forward_hook(hook))
    return chosen, handles


@pytest.mark.parametrize("arch", ARCHS)
def test_tokens_are_routed_to_several_experts_as_in_transformers(arch, moe_dir):
    directory = moe_dir(arch)
    (prompt,) = make_prompts(VOCAB_SIZE, (40,))
    stages = load_stages(directory, [(0, None)])
    ours, handles = _record_routing(stages[0], TopKRouter)
    prompt_logits(stages, prompt)
    hf_model = load_hf(directory)
    hf_router_type = next(type(m) for m in hf_model.modules()
                          if type(m).__name__.endswith("TopKRouter"))
    theirs, hf_handles = _record_routing(hf_model, hf_router_type)
    with torch.no_grad():
        hf_model(torch.tensor([prompt]))
    for handle in handles + hf_handles:
        handle.remove()

    assert sorted(ours) == sorted(theirs) == _sparse_layers(arch)
    for layer in ours:
        (ids,) = ours[layer]  # [T, k]
        (hf_ids,) = theirs[layer]
        assert torch.equal(ids.sort(dim=-1).values, hf_ids.sort(dim=-1).values), layer
        assert len(ids.unique()) >= NUM_EXPERTS // 2, (layer, ids.unique().tolist())


# Per-expert checkpoint matrices (what save_pretrained and the hub hold) of each fused tensor.
PER_EXPERT = {
    "mixtral": ("block_sparse_moe", {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}),
    "qwen2_moe": ("mlp", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
    "qwen3_moe": ("mlp", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
}


def _rewrite_as_fused_experts(arch: str, source, target):
    """Copy a per-expert checkpoint with its experts stacked into 3-D ``mlp.experts.*``."""
    block, parts = PER_EXPERT[arch]
    tensors = load_file(str(source / "model.safetensors"))
    for layer in _sparse_layers(arch):
        old, new = f"model.layers.{layer}.{block}", f"model.layers.{layer}.mlp"
        for fused, names in parts.items():
            tensors[f"{new}.experts.{fused}"] = torch.stack([
                torch.cat([tensors.pop(f"{old}.experts.{i}.{name}.weight") for name in names])
                for i in range(NUM_EXPERTS)
            ])  # [E, rows, cols]
        tensors[f"{new}.gate.weight"] = tensors.pop(f"{old}.gate.weight")
    shutil.copytree(source, target)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("arch", list(PER_EXPERT))
def test_fused_expert_checkpoint_gives_the_same_logits(arch, moe_dir, tmp_path):
    source = moe_dir(arch)
    keys = set(load_file(str(source / "model.safetensors")))
    assert any(".experts.0." in key for key in keys)  # save_pretrained wrote per-expert
    fused = _rewrite_as_fused_experts(arch, source, tmp_path / "fused")
    (prompt,) = make_prompts(VOCAB_SIZE, (23,))
    expected = prompt_logits(load_stages(source, [(0, None)]), prompt)
    assert torch.equal(prompt_logits(load_stages(fused, [(0, None)]), prompt), expected)
    split = load_stages(fused, [(0, 1), (1, None)])
    assert (prompt_logits(split, prompt) - expected).abs().max().item() <= 1e-5
    with torch.no_grad():  # transformers reads the rewritten checkpoint the same way
        hf_fused = load_hf(fused)(torch.tensor([prompt])).logits[0]
        hf_source = load_hf(source)(torch.tensor([prompt])).logits[0]
    assert (hf_fused - hf_source).abs().max().item() <= 1e-6


def test_gpt_oss_sliding_window_is_shorter_than_the_prompts(moe_dir):
    directory = moe_dir("gpt_oss")
    config = json.loads((directory / "config.json").read_text())
    assert config["sliding_window"] == GPT_OSS_WINDOW < max(40, 64)
    (model,) = load_stages(directory, [(0, None)])
    windows = [attn.window for attn in model.attention_layers()]
    assert windows == [GPT_OSS_WINDOW, None, GPT_OSS_WINDOW]
