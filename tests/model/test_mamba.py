"""Mamba: no KV blocks, and per-request state held per stage for the stage's own layers.

Its equivalence with ``transformers`` is checked in ``test_architectures.py`` (which also
checks, after greedy batching in every scenario, that state slots are held exactly by the
requests an executor holds).
"""

from __future__ import annotations

import torch

from molink import LLM
from tests.model.arch_checks import greedy_tokens, hf_greedy


def test_blocks_do_not_limit_a_model_without_attention(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir("mamba")), dtype="float32", device="cpu", block_size=16,
              max_num_seqs=8)
    (executor,) = llm.llm_engine.executors
    assert executor.kv_caches == []
    # Bookkeeping blocks for max_num_seqs requests of the full model length (2048 tokens).
    assert executor.num_blocks == 8 * 2048 // 16
    assert llm.llm_engine.max_model_len == 2048
    assert executor.state_cache.num_slots == 8


def test_each_stage_holds_state_only_for_its_own_layers(tiny_model_dir):
    directory = tiny_model_dir("mamba")
    prompts, expected = hf_greedy(directory)
    llm = LLM(model=str(directory), dtype="float32", device="cpu", block_size=8,
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
