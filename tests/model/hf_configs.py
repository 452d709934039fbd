"""Tiny ``transformers`` configs, one function per architecture layout, and weight perturbations.

``initializer_range`` is raised above the default so logits are spread out and greedy ties
(which would make token-exact comparisons flaky for reasons unrelated to correctness) do not
happen. Each ``*_config(**overrides)`` returns a fresh config; ``tiny_configs`` registers them.
"""

from __future__ import annotations

import functools

import torch

from tests.model_factory import VOCAB_SIZE

SPECIAL_IDS = {"vocab_size": VOCAB_SIZE, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3}


def common(**overrides) -> dict:
    """The tiny decoder most configs start from: 4 layers, 64 wide, GQA (4 heads, 2 kv)."""
    values = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
        rms_norm_eps=1e-6, **SPECIAL_IDS,  # vocab_size, bos / eos / pad ids
    )
    values.update(overrides)
    return values



# ---------------------------------------------------------------------------------------------
# Llama, Mistral, Qwen2, Qwen3.


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**common(**{"tie_word_embeddings": False, **overrides}))


def llama3_config(**overrides):
    """Llama 3.x: rope_scaling of type llama3 and tied embeddings (as in Llama 3.2 1B/3B)."""
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaConfig(**common(tie_word_embeddings=True, rope_parameters=rope, **overrides))


def mistral_config(**overrides):
    from transformers import MistralConfig

    return MistralConfig(**common(sliding_window=4096, head_dim=32, **overrides))


MISTRAL_WINDOW = 16


def mistral_window_config(**overrides):
    """Mistral with a sliding window shorter than the longer test prompts (40, 64 tokens)."""
    from transformers import MistralConfig

    return MistralConfig(**common(sliding_window=MISTRAL_WINDOW, head_dim=32, **overrides))


def qwen2_config(**overrides):
    from transformers import Qwen2Config

    return Qwen2Config(**common(**{"tie_word_embeddings": True, **overrides}))


def qwen3_config(**overrides):
    from transformers import Qwen3Config

    return Qwen3Config(**common(head_dim=16, tie_word_embeddings=False, **overrides))


# ---------------------------------------------------------------------------------------------
# GPT-2, BLOOM, Falcon (each block layout), Phi: 3 layers.


def gpt2_config(**overrides):
    from transformers import GPT2Config

    return GPT2Config(**dict(dict(n_embd=64, n_layer=3, n_head=4, n_inner=128, n_positions=256,
                                  initializer_range=0.2, **SPECIAL_IDS), **overrides))


def bloom_config(**overrides):
    from transformers import BloomConfig

    # 6 heads: not a power of two, so the "extra" ALiBi slopes are exercised too.
    return BloomConfig(**dict(dict(hidden_size=72, n_layer=3, n_head=6, initializer_range=0.2,
                                   **SPECIAL_IDS), **overrides))


def _falcon(**values):
    from transformers import FalconConfig

    return FalconConfig(**dict(dict(hidden_size=64, num_hidden_layers=3, ffn_hidden_size=128,
                                    initializer_range=0.2, **SPECIAL_IDS), **values))


def falcon7b_config(**overrides):
    """Falcon-7B layout: parallel attention + MLP, multi-query, one LayerNorm, rotary."""
    return _falcon(**{"num_attention_heads": 4, "multi_query": True, "parallel_attn": True,
                      "new_decoder_architecture": False, "alibi": False, "bias": False,
                      **overrides})


def falcon40b_config(**overrides):
    """Falcon-40B/180B layout: new decoder architecture, grouped kv, ln_attn + ln_mlp, rotary."""
    return _falcon(**{"num_attention_heads": 8, "num_kv_heads": 2,
                      "new_decoder_architecture": True, "parallel_attn": True, "alibi": False,
                      "bias": False, "tie_word_embeddings": False, **overrides})


def falcon_rw_config(**overrides):
    """Falcon-RW layout: sequential block, per-head qkv, ALiBi, bias."""
    return _falcon(**{"num_attention_heads": 4, "multi_query": False, "parallel_attn": False,
                      "new_decoder_architecture": False, "alibi": True, "bias": True,
                      **overrides})


def phi_config(**overrides):
    from transformers import PhiConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    return PhiConfig(**dict(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, rope_parameters=rope,
                                 qk_layernorm=True, initializer_range=0.2, **SPECIAL_IDS),
                            **overrides))


# ---------------------------------------------------------------------------------------------
# Gemma, Gemma 2, Gemma 3 (text), Cohere, GLM-4, Phi-3. Norm weights and biases are moved off
# their 0 / 1 initial values (``randomised_norms``), so a misplaced ``1 +``, a per-head q/k
# norm read in the wrong order or a dropped bias changes the logits.

GEMMA_WINDOW = 16  # shorter than the longer prompts (23, 40, 64)
PHI3_WINDOW = 128  # original_max_position_embeddings: longer than prompt + output (64 + 32)


def gemma_config(**overrides):
    from transformers import GemmaConfig

    # head_dim 32 != hidden / heads = 16
    return GemmaConfig(**common(head_dim=32, hidden_act="gelu_pytorch_tanh",
                                tie_word_embeddings=True, **overrides))


def gemma2_config(**overrides):
    from transformers import Gemma2Config

    # layer_types default: sliding, full, sliding, full. Small caps so tanh really bends.
    return Gemma2Config(**common(head_dim=32, sliding_window=GEMMA_WINDOW,
                                 query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                 final_logit_softcapping=8.0, **overrides))


def gemma3_config(**overrides):
    from transformers import Gemma3TextConfig

    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    layer_types = ["sliding_attention", "full_attention", "sliding_attention",
                   "sliding_attention"]
    return Gemma3TextConfig(**common(**{
        "head_dim": 32, "sliding_window": GEMMA_WINDOW, "query_pre_attn_scalar": 32,
        "layer_types": layer_types, "rope_parameters": rope, "final_logit_softcapping": 12.0,
        **overrides}))


def cohere_config(**overrides):
    from transformers import CohereConfig

    values = common(use_qk_norm=True, logit_scale=0.5, attention_bias=True, layer_norm_eps=1e-5,
                    tie_word_embeddings=True, **overrides)
    del values["rms_norm_eps"]  # Cohere normalises with LayerNorm
    return CohereConfig(**values)


def glm_config(**overrides):
    from transformers import GlmConfig

    return GlmConfig(**common(head_dim=16, partial_rotary_factor=0.5, attention_bias=True,
                              **overrides))


def phi3_config(**overrides):
    from transformers import Phi3Config

    # Phi-4-mini style: partial rotary (12 of 16 dims) and LongRoPE.
    longrope = {"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2, 2.9, 3.5],
                "long_factor": [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]}
    return Phi3Config(**common(**{"partial_rotary_factor": 0.75, "rope_scaling": longrope,
                                  "original_max_position_embeddings": PHI3_WINDOW,
                                  "rms_norm_eps": 1e-5, **overrides}))


def randomised_norms(config):
    """The HF model with norm weights and biases moved off their 0 / 1 initial values."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model


# ---------------------------------------------------------------------------------------------
# Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss: 8 experts, top-2; biases (zero at init) and
# attention sinks get random values (``random_biases``).

NUM_EXPERTS = 8
GPT_OSS_WINDOW = 12  # shorter than the longest test prompts (40, 64 tokens)


def _moe(**values) -> dict:
    return common(**{"num_hidden_layers": 3, "tie_word_embeddings": False, **values})


def mixtral_config(**overrides):
    from transformers import MixtralConfig

    return MixtralConfig(**_moe(intermediate_size=48, num_local_experts=NUM_EXPERTS,
                                num_experts_per_tok=2, **overrides))


def qwen2_moe_config(**overrides):
    """Layer 1 is dense (``mlp_only_layers``); top-k weights are not renormalised."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**_moe(intermediate_size=96, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=48, num_experts=NUM_EXPERTS,
                                 num_experts_per_tok=2, norm_topk_prob=False,
                                 mlp_only_layers=[1], **overrides))


def qwen3_moe_config(**overrides):
    """Layers 1 and 3 sparse (``decoder_sparse_step=2``); top-k weights renormalised."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_moe(**{"num_hidden_layers": 4, "head_dim": 16,
                                    "intermediate_size": 96, "moe_intermediate_size": 32,
                                    "num_experts": NUM_EXPERTS, "num_experts_per_tok": 2,
                                    "norm_topk_prob": True, "decoder_sparse_step": 2,
                                    **overrides}))


def gpt_oss_config(**overrides):
    """Alternating sliding (window 12) / full layers, YaRN RoPE, 8 experts, top-2."""
    from transformers import GptOssConfig

    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0,
            "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}
    return GptOssConfig(**_moe(intermediate_size=32, head_dim=16, num_local_experts=NUM_EXPERTS,
                               num_experts_per_tok=2, sliding_window=GPT_OSS_WINDOW,
                               rope_parameters=rope, **overrides))


def random_biases(config):
    """The HF model with biases (zero at init) and attention sinks drawn at random."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                param.normal_(0.0, 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# DeepSeek-V2 and -V3. Each has a dense first layer, ``v_head_dim`` narrower than the key head
# (the cache pads values) and 8 experts. The two main entries have the most switches on:
#
# * ``deepseek-v2``: direct ``q_proj`` (``q_lora_rank=None``), ``group_limited_greedy``
#   routing (top-3 within one of two groups, so the group limit changes the choice), YaRN RoPE
#   with ``mscale_all_dim`` (softmax scale), attention biases;
# * ``deepseek-v3``: low-rank q, ``noaux_tc`` grouped sigmoid routing with a non-zero
#   ``e_score_correction_bias``, normalised weights, interleaved RoPE with YaRN whose
#   ``mscale != mscale_all_dim`` (cos/sin attention factor).
#
# Two variants flip the remaining switches: ``deepseek-v2-greedy`` (low-rank q, greedy top-k,
# plain RoPE) and ``deepseek-v3-plain`` (direct ``q_proj``, one expert group, non-interleaved
# RoPE, unnormalised weights).

DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                 "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1}


def _deepseek(**overrides) -> dict:
    return common(**{
        "intermediate_size": 96, "moe_intermediate_size": 32, "num_key_value_heads": 4,
        "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "n_routed_experts": NUM_EXPERTS, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "tie_word_embeddings": False, **overrides})


def deepseek_v2_config(**overrides):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(**_deepseek(**overrides))


def deepseek_v3_config(**overrides):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**_deepseek(**overrides))


def randomised_constant_inits(tensors: dict) -> dict:
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


DEEPSEEK_CONFIGS = {
    "deepseek-v2": functools.partial(
        deepseek_v2_config, q_lora_rank=None, topk_method="group_limited_greedy", n_group=2,
        topk_group=1, num_experts_per_tok=3, routed_scaling_factor=1.5, attention_bias=True,
        rope_parameters=dict(DEEPSEEK_YARN, mscale=0.707, mscale_all_dim=0.707)),
    "deepseek-v2-greedy": functools.partial(
        deepseek_v2_config, q_lora_rank=24, topk_method="greedy", routed_scaling_factor=1.0),
    "deepseek-v3": functools.partial(
        deepseek_v3_config, q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_interleave=True,
        rope_parameters=dict(DEEPSEEK_YARN, mscale=1.0, mscale_all_dim=0.8)),
    "deepseek-v3-plain": functools.partial(
        deepseek_v3_config, q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, rope_interleave=False),
}

# ---------------------------------------------------------------------------------------------
# Mamba.


def mamba_config(**overrides):
    from transformers import MambaConfig

    values = dict(hidden_size=64, state_size=8, num_hidden_layers=4, expand=2, conv_kernel=4,
                  initializer_range=0.2, layer_norm_epsilon=1e-6,
                  architectures=["MambaForCausalLM"], **SPECIAL_IDS)
    return MambaConfig(**dict(values, **overrides))

# ---------------------------------------------------------------------------------------------
# Native models that remote-code checkpoints are rewritten from (see ``remote_code``).

GLM_HEAD_DIM = 24  # heads * head_dim (96) != hidden (64): projections are not square
GLM_ROPE_RATIO = 2.0


def qwen2_untied_config():
    """Qwen2 without GQA and with its own LM head, as Qwen 1."""
    config = qwen2_config(num_key_value_heads=4)
    config.tie_word_embeddings = False
    return config


def glm_native_config():
    """transformers' GLM-4 port: ChatGLM's math under Llama-style names."""
    from transformers import GlmConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0 * GLM_ROPE_RATIO,
                "partial_rotary_factor": 0.5}
    return GlmConfig(hidden_size=64, intermediate_size=128,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=GLM_HEAD_DIM, max_position_embeddings=512,
                     initializer_range=0.2, rms_norm_eps=1e-6, attention_bias=True,
                     tie_word_embeddings=False, rope_parameters=rope, **SPECIAL_IDS)
