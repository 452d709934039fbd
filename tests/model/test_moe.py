"""Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss: routing, fused expert checkpoints, windows.

Their equivalence with ``transformers`` is checked in ``test_architectures.py``. Here: every
sparse layer routes the test prompt to several experts, and to the same experts as
``transformers``; checkpoints whose experts are stored as fused 3-D
tensors give the same logits as the per-expert layout ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from molink.model.layers.moe import TopKRouter
from tests.model.arch_checks import make_prompts
from tests.model.helpers import load_stages, prompt_logits
from tests.model.hf_configs import GPT_OSS_WINDOW, NUM_EXPERTS
from tests.model.tiny_configs import TINY_MODELS
from tests.model_factory import VOCAB_SIZE, load_hf

ARCHS = ["mixtral", "qwen2-moe", "qwen3-moe", "gpt-oss"]


def _sparse_layers(arch: str) -> list[int]:
    config = TINY_MODELS[arch].config()
    if arch in ("qwen2-moe", "qwen3-moe"):
        return [i for i in range(config.num_hidden_layers)
                if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0]
    return list(range(config.num_hidden_layers))


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
def test_tokens_are_routed_to_several_experts_as_in_transformers(arch, tiny_model_dir):
    directory = tiny_model_dir(arch)
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
    "qwen2-moe": ("mlp", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
    "qwen3-moe": ("mlp", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
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
def test_fused_expert_checkpoint_gives_the_same_logits(arch, tiny_model_dir, tmp_path):
    source = tiny_model_dir(arch)
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


def test_gpt_oss_sliding_window_is_shorter_than_the_prompts(tiny_model_dir):
    directory = tiny_model_dir("gpt-oss")
    config = json.loads((directory / "config.json").read_text())
    assert config["sliding_window"] == GPT_OSS_WINDOW < max(40, 64)
    (model,) = load_stages(directory, [(0, None)])
    windows = [attn.window for attn in model.attention_layers()]
    assert windows == [GPT_OSS_WINDOW, None, GPT_OSS_WINDOW]
