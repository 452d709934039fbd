"""Mamba equals Hugging Face ``transformers`` (fp32, CPU); its per-request state lives per stage."""

from __future__ import annotations

import pytest
import torch

from molink import LLM
from tests.model.arch_checks import (SCENARIOS, check_greedy, check_layer_split,
                                     check_prompt_logits, greedy_tokens, hf_greedy)
from tests.model_factory import VOCAB_SIZE, build_model_from_config

NUM_LAYERS = 4


def mamba_config(**overrides):
    from transformers import MambaConfig

    values = dict(vocab_size=VOCAB_SIZE, hidden_size=64, state_size=8, num_hidden_layers=NUM_LAYERS,
                  expand=2, conv_kernel=4, initializer_range=0.2, layer_norm_epsilon=1e-6,
                  bos_token_id=0, eos_token_id=1, pad_token_id=3, architectures=["MambaForCausalLM"])
    values.update(overrides)
    return MambaConfig(**values)


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory):
    return build_model_from_config(mamba_config(), tmp_path_factory.mktemp("mamba"))


def test_prompt_logits_equal_transformers(mamba_dir):
    check_prompt_logits(mamba_dir)


def test_untied_biased_variant_logits_equal_transformers(tmp_path):
    config = mamba_config(tie_word_embeddings=False, use_bias=True, residual_in_fp32=False)
    check_prompt_logits(build_model_from_config(config, tmp_path, seed=1))


def test_split_into_layer_ranges_keeps_logits(mamba_dir):
    check_layer_split(mamba_dir, num_layers=NUM_LAYERS)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_continuous_batching_equals_transformers_generate(scenario, mamba_dir):
    llm = check_greedy(mamba_dir, scenario)
    (executor,) = llm.llm_engine.executors
    # A slot is held exactly by the requests the executor holds (finished ones are freed by
    # the next plan, so the last few may still be there); preempted ones gave theirs back.
    cache = executor.state_cache
    assert cache.num_slots - cache.num_free_slots == len(executor.requests)


def test_blocks_do_not_limit_a_model_without_attention(mamba_dir):
    llm = LLM(model=str(mamba_dir), dtype="float32", device="cpu", block_size=16, max_num_seqs=8)
    (executor,) = llm.llm_engine.executors
    assert executor.kv_caches == []
    # Bookkeeping blocks for max_num_seqs requests of the full model length (2048 tokens).
    assert executor.num_blocks == 8 * 2048 // 16
    assert llm.llm_engine.max_model_len == 2048
    assert executor.state_cache.num_slots == 8


def test_each_stage_holds_state_only_for_its_own_layers(mamba_dir):
    prompts, expected = hf_greedy(mamba_dir)
    llm = LLM(model=str(mamba_dir), dtype="float32", device="cpu", block_size=8,
              stage_layers=[(0, 2), (2, 4)])
    assert greedy_tokens(llm, prompts) == expected
    for executor, own_layers in zip(llm.llm_engine.executors, (["0", "1"], ["2", "3"])):
        model, cache = executor.model, executor.state_cache
        assert list(model.backbone.layers) == own_layers
        mixers = [model.backbone.layers[i].mixer for i in own_layers]
        assert model.state_layers() == mixers
        # One (conv, ssm) pair per own layer, bound to that layer and nothing else.
        assert len(cache.tensors) == len(own_layers)
        for mixer, tensors in zip(mixers, cache.tensors):
            assert mixer.state is tensors
            conv, ssm = tensors
            assert conv.shape == (cache.num_slots, 128, 3)
            assert ssm.shape == (cache.num_slots, 128, 8) and ssm.dtype == torch.float32
            assert ssm.abs().sum() > 0  # the stage really kept state for its layers
