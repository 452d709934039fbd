"""The registry of tiny random models: every architecture MoLink serves, and its variants.

``TINY_MODELS[name]`` says how to build a tiny model directory and which held checks of
``tests/model/test_architectures.py`` it goes through (``arch_checks``: prompt logits, layer
splits, greedy continuous batching in every scenario). Native entries are built from a
``transformers`` config class and compared with ``transformers``; remote-code entries are
rewritten into their checkpoint layout and compared with the reference ``remote_code`` names.
A new architecture needs an entry here (``test_every_registered_architecture_has_a_tiny_model``).

The ``transformers`` configs themselves are in ``hf_configs``. Most variants of a family are
checked on prompt logits only (keeps the suite fast).
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.model import hf_configs, remote_code
from tests.model.arch_checks import Reference, hf_reference, plain_reference
from tests.model_factory import build_model_from_config

ALL_CHECKS = ("logits", "layer_split", "greedy")
LOGITS_AND_SPLIT = ("logits", "layer_split")
LOGITS_ONLY = ("logits",)


@dataclass(frozen=True)
class TinyModel:
    """One entry: how to build the model directory and what it must equal."""

    architecture: str  # config.json ``architectures[0]``
    num_layers: int
    build: Callable[..., Path]  # (empty directory, **config overrides) -> model directory
    config: Callable[..., Any] | None = None  # the ``transformers`` config (native entries)
    reference: Callable[[Path], Reference] = hf_reference  # model directory -> its reference
    checks: tuple[str, ...] = ALL_CHECKS
    logit_lengths: tuple[int, ...] = (23, 40)
    llm_options: dict = field(default_factory=dict)  # for scenarios that do not size the cache


def native(architecture: str, config: Callable, num_layers: int, *, model_class=None,
           rewrite: Callable[[dict], dict] | None = None, seed: int = 0, **entry) -> TinyModel:
    """An entry saved by ``transformers`` (``model_class`` may perturb the initial weights;
    ``rewrite`` then transforms the saved tensors)."""

    def build(directory: Path, **overrides) -> Path:
        directory = build_model_from_config(config(**overrides), directory, seed, model_class)
        if rewrite is not None:
            rewrite_checkpoint(directory, rewrite)
        return directory

    return TinyModel(architecture, num_layers, build, config=config, **entry)


def remote(architecture: str, build: Callable[[Path], Path], num_layers: int,
           reference: Callable[[Path], Reference], **entry) -> TinyModel:
    return TinyModel(architecture, num_layers, build, reference=reference, **entry)


def rewrite_checkpoint(directory: Path, transform: Callable[[dict], dict]) -> None:
    path = directory / "model.safetensors"
    tensors = transform(load_file(str(path)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Remote-code checkpoints: native models rewritten into the remote-code layouts.


def build_baichuan(root: Path) -> Path:
    """Baichuan-7B layout (rotary, plain head; v1 spelling) == Llama."""
    llama = hf_configs.llama_config(num_key_value_heads=4)
    source = build_model_from_config(llama, root / "native")
    return remote_code.baichuan_from_llama(source, root / "baichuan", "BaiChuanForCausalLM",
                                           rotary=True)


def build_baichuan2(root: Path) -> Path:
    """Baichuan2-7B layout (rotary, NormHead) == Llama whose lm_head rows were normalised
    (saved as ``root / "reference"``)."""
    llama = hf_configs.llama_config(num_key_value_heads=4)
    source = build_model_from_config(llama, root / "native")
    directory = remote_code.baichuan_from_llama(source, root / "baichuan2", "BaichuanForCausalLM",
                                                rotary=True, norm_head=True)
    reference = root / "reference"
    shutil.copytree(source, reference)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["lm_head.weight"] = F.normalize(tensors["lm_head.weight"], dim=-1)
    save_file(tensors, str(reference / "model.safetensors"))
    return directory


def build_baichuan_alibi(root: Path) -> Path:
    """Baichuan2-13B layout (ALiBi, NormHead); 5 heads: slopes for a non-power-of-two count."""
    llama = hf_configs.llama_config(hidden_size=80, num_attention_heads=5, num_key_value_heads=5)
    source = build_model_from_config(llama, root / "native")
    return remote_code.baichuan_from_llama(source, root / "baichuan_alibi", "BaichuanForCausalLM",
                                           rotary=False, position_embedding_type="alibi",
                                           norm_head=True)


def build_qwen(root: Path, rotary_pct: float = 1.0) -> Path:
    """Qwen 1 (== Qwen2 without GQA, saved as ``root / "native"``, when ``rotary_pct`` is 1)."""
    source = build_model_from_config(hf_configs.qwen2_untied_config(), root / "native")
    return remote_code.qwen_from_qwen2(source, root / "qwen", rotary_pct=rotary_pct)


def build_chatglm(root: Path) -> Path:
    """ChatGLM3-6B layout (multi-query attention, q/k/v bias, RMSNorm, rope_ratio); the GLM-4
    model it was rewritten from is ``root / "native"``."""
    source = build_model_from_config(hf_configs.glm_native_config(), root / "native")
    return remote_code.chatglm_from_glm(source, root / "chatglm")


def _native_reference(directory: Path) -> Reference:
    """The native model a remote-code checkpoint was rewritten from."""
    return hf_reference(directory.parent / "native")


def _normed_head_reference(directory: Path) -> Reference:
    return hf_reference(directory.parent / "reference")


# ---------------------------------------------------------------------------------------------
# The registry.


def _dense(architecture: str, config: str, num_layers: int = 4, **entry) -> TinyModel:
    return native(architecture, getattr(hf_configs, config), num_layers, **entry)


def _norms(architecture: str, config: str) -> TinyModel:
    """Norm weights and biases moved off 0 / 1 (``hf_configs.randomised_norms``)."""
    return _dense(architecture, config, model_class=hf_configs.randomised_norms)


def _moe(architecture: str, config: str, num_layers: int = 3) -> TinyModel:
    # The scenarios that do not size the KV cache get one far larger than the prompts need
    # (no preemption) instead of the CPU default of 2 GiB, which takes seconds to zero.
    return _dense(architecture, config, num_layers, model_class=hf_configs.random_biases,
                  llm_options={"num_kv_blocks": 512})


def _deepseek(architecture: str, name: str, checks=ALL_CHECKS) -> TinyModel:
    return native(architecture, hf_configs.DEEPSEEK_CONFIGS[name], 4, checks=checks,
                  rewrite=hf_configs.randomised_constant_inits)


def _variant(architecture: str, config: str, **overrides) -> TinyModel:
    """A less common setting of a family (3 layers), checked on prompt logits only."""
    partial = functools.partial(getattr(hf_configs, config), **overrides)
    return native(architecture, partial, 3, checks=LOGITS_ONLY, logit_lengths=(23,))


def _plain(forward: Callable) -> Callable[[Path], Reference]:
    return functools.partial(plain_reference, forward)


TINY_MODELS: dict[str, TinyModel] = {
    "llama": _dense("LlamaForCausalLM", "llama_config"),
    "llama3": _dense("LlamaForCausalLM", "llama3_config"),
    "mistral": _dense("MistralForCausalLM", "mistral_config"),
    "mistral-window": _dense("MistralForCausalLM", "mistral_window_config"),
    "qwen2": _dense("Qwen2ForCausalLM", "qwen2_config"),
    "qwen3": _dense("Qwen3ForCausalLM", "qwen3_config"),
    "gpt2": _dense("GPT2LMHeadModel", "gpt2_config", 3),
    "bloom": _dense("BloomForCausalLM", "bloom_config", 3),
    "falcon-7b": _dense("FalconForCausalLM", "falcon7b_config", 3),
    "falcon-40b": _dense("FalconForCausalLM", "falcon40b_config", 3),
    "falcon-rw": _dense("FalconForCausalLM", "falcon_rw_config", 3),
    "phi": _dense("PhiForCausalLM", "phi_config", 3),
    "gpt2-inverse-layer-scale": _variant("GPT2LMHeadModel", "gpt2_config",
                                         scale_attn_by_inverse_layer_idx=True, n_inner=None),
    "bloom-residual-after-norm": _variant("BloomForCausalLM", "bloom_config",
                                          apply_residual_connection_post_layernorm=True),
    "falcon-40b-one-norm": _variant("FalconForCausalLM", "falcon40b_config",
                                    num_ln_in_parallel_attn=1),
    "falcon-7b-bias-untied": _variant("FalconForCausalLM", "falcon7b_config", bias=True,
                                      tie_word_embeddings=False),
    "phi-no-qk-norm-tied": _variant("PhiForCausalLM", "phi_config", qk_layernorm=False,
                                    tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                     "partial_rotary_factor": 0.4}),
    "gemma": _norms("GemmaForCausalLM", "gemma_config"),
    "gemma2": _norms("Gemma2ForCausalLM", "gemma2_config"),
    "gemma3": _norms("Gemma3ForCausalLM", "gemma3_config"),
    "cohere": _norms("CohereForCausalLM", "cohere_config"),
    "glm": _norms("GlmForCausalLM", "glm_config"),
    "phi3": _norms("Phi3ForCausalLM", "phi3_config"),
    "mixtral": _moe("MixtralForCausalLM", "mixtral_config"),
    "qwen2-moe": _moe("Qwen2MoeForCausalLM", "qwen2_moe_config"),
    "qwen3-moe": _moe("Qwen3MoeForCausalLM", "qwen3_moe_config", num_layers=4),
    "gpt-oss": _moe("GptOssForCausalLM", "gpt_oss_config"),
    "deepseek-v2": _deepseek("DeepseekV2ForCausalLM", "deepseek-v2"),
    "deepseek-v2-greedy": _deepseek("DeepseekV2ForCausalLM", "deepseek-v2-greedy", LOGITS_ONLY),
    "deepseek-v3": _deepseek("DeepseekV3ForCausalLM", "deepseek-v3"),
    "deepseek-v3-plain": _deepseek("DeepseekV3ForCausalLM", "deepseek-v3-plain", LOGITS_ONLY),
    "mamba": _dense("MambaForCausalLM", "mamba_config"),
    "mamba-untied-bias": native("MambaForCausalLM", functools.partial(
        hf_configs.mamba_config, tie_word_embeddings=False, use_bias=True,
        residual_in_fp32=False), 4, seed=1, checks=LOGITS_ONLY),
    # Remote-code checkpoints, read natively (``remote_code`` says what each one equals).
    "baichuan": remote("BaiChuanForCausalLM", build_baichuan, 4, _native_reference,
                       checks=LOGITS_AND_SPLIT),
    "baichuan2": remote("BaichuanForCausalLM", build_baichuan2, 4, _normed_head_reference),
    "baichuan2-alibi": remote("BaichuanForCausalLM", build_baichuan_alibi, 4,
                              _plain(remote_code.baichuan_alibi_forward)),
    "chatglm3": remote("ChatGLMModel", build_chatglm, 4, _plain(remote_code.chatglm_forward)),
    "chatglm-variant": remote("ChatGLMForConditionalGeneration",
                              remote_code.build_chatglm_variant, 3,
                              _plain(remote_code.chatglm_forward), checks=LOGITS_AND_SPLIT),
    "qwen": remote("QWenLMHeadModel", build_qwen, 4, _native_reference),
    "qwen-partial-rotary": remote("QWenLMHeadModel", functools.partial(build_qwen, rotary_pct=0.5),
                                  4, _plain(remote_code.qwen_forward), checks=LOGITS_AND_SPLIT),
}


def names_with(check: str) -> list[str]:
    """Registry names whose entry runs ``check``, in registry order."""
    return [name for name, entry in TINY_MODELS.items() if check in entry.checks]
