"""Remote-code checkpoints (Baichuan, ChatGLM2/3, Qwen 1): references, variant detection, refusals.

Their equivalence with their references is checked in ``test_architectures.py``
(``remote_code`` says what each reference is). Here: the plain references can fail and are
themselves right, and the configs normalise and are refused as the original code would.
"""

from __future__ import annotations

import pytest
import torch
from transformers import PretrainedConfig

from molink.model.baichuan import BaichuanForCausalLM, BaichuanOptions
from molink.model.chatglm import ChatGLMForConditionalGeneration
from molink.model.loader import load_config
from molink.model.qwen import QWenLMHeadModel
from tests.model.arch_checks import LOGIT_TOL, hf_reference, make_prompts
from tests.model.hf_configs import GLM_HEAD_DIM, GLM_ROPE_RATIO
from tests.model.remote_code import baichuan_alibi_slopes
from tests.model.tiny_configs import TINY_MODELS
from tests.model_factory import VOCAB_SIZE, load_hf


def test_chatglm_reference_equals_transformers_glm(tiny_model_dir):
    """The plain ChatGLM reference is itself right: transformers' GLM port, same weights."""
    directory = tiny_model_dir("chatglm3")
    reference = TINY_MODELS["chatglm3"].reference(directory)
    native = load_hf(directory.parent / "native")
    for prompt in make_prompts(VOCAB_SIZE, (40,)):
        with torch.no_grad():
            expected = native(torch.tensor([prompt])).logits[0]
        assert (reference.logits(prompt) - expected).abs().max().item() <= LOGIT_TOL


def test_norm_head_changes_the_logits(tiny_model_dir):
    """The NormHead check can fail: the plain Llama head gives different logits."""
    directory = tiny_model_dir("baichuan2")
    plain_head = hf_reference(directory.parent / "native").logits
    norm_head = TINY_MODELS["baichuan2"].reference(directory).logits
    (prompt,) = make_prompts(VOCAB_SIZE, (23,))
    assert (plain_head(prompt) - norm_head(prompt)).abs().max().item() > 0.1


def test_alibi_slopes_for_a_non_power_of_two_head_count():
    from molink.model.layers.alibi import alibi_slopes

    for num_heads in (5, 8, 40):
        expected = torch.tensor(baichuan_alibi_slopes(num_heads))
        assert torch.allclose(alibi_slopes(num_heads), expected, rtol=1e-6)


def _hf(**raw) -> PretrainedConfig:
    return PretrainedConfig(**raw)


BAICHUAN_13B = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
                "vocab_size": 64000, "hidden_size": 5120, "intermediate_size": 13696,
                "num_hidden_layers": 40, "num_attention_heads": 40, "model_max_length": 4096,
                "rms_norm_eps": 1e-6, "hidden_act": "silu"}


def test_baichuan_variant_detection_follows_the_original_code():
    assert BaichuanForCausalLM.arch_config(_hf(**BAICHUAN_13B)).options == BaichuanOptions(
        use_alibi=True, norm_head=False)
    baichuan2_7b = dict(BAICHUAN_13B, vocab_size=125696, num_hidden_layers=32,
                        max_position_embeddings=4096)
    arch = BaichuanForCausalLM.arch_config(_hf(**baichuan2_7b))
    assert arch.options == BaichuanOptions(use_alibi=False, norm_head=True)
    assert arch.max_position_embeddings == 4096 and arch.num_kv_heads == 40
    # Explicit config fields win over the size heuristics.
    explicit = dict(BAICHUAN_13B, position_embedding_type="ROPE", norm_head=True)
    assert BaichuanForCausalLM.arch_config(_hf(**explicit)).options == BaichuanOptions(
        use_alibi=False, norm_head=True)
    with pytest.raises(ValueError, match="position_embedding_type"):
        BaichuanForCausalLM.arch_config(_hf(**dict(BAICHUAN_13B, position_embedding_type="xpos")))


def test_remote_code_configs_normalise(tiny_model_dir):
    glm = load_config(str(tiny_model_dir("chatglm3"))).arch
    assert (glm.vocab_size, glm.num_kv_heads, glm.head_dim, glm.intermediate_size) == (
        VOCAB_SIZE, 2, GLM_HEAD_DIM, 128)
    assert glm.rope_theta == 10000.0 * GLM_ROPE_RATIO and glm.max_position_embeddings == 512
    qwen = load_config(str(tiny_model_dir("qwen"))).arch
    assert qwen.intermediate_size == 128 and qwen.max_position_embeddings == 512


def test_unsupported_remote_code_options_are_refused():
    chatglm = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": 2,
               "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
               "kv_channels": 16, "padded_vocab_size": 512, "multi_query_attention": True,
               "multi_query_group_num": 2}
    with pytest.raises(ValueError, match="pre_seq_len"):
        ChatGLMForConditionalGeneration.arch_config(_hf(**chatglm, pre_seq_len=8))
    with pytest.raises(ValueError, match="quantization_bit"):
        ChatGLMForConditionalGeneration.arch_config(_hf(**chatglm, quantization_bit=4))
    qwen = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": 64,
            "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 256,
            "vocab_size": 512, "kv_channels": 32}
    with pytest.raises(ValueError, match="kv_channels"):
        QWenLMHeadModel.arch_config(_hf(**qwen))
