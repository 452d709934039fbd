"""Chained in-process stages send their hidden states through the wire format, compressed
as asked, so the engine reproduces what a compressed hop would deliver."""

from __future__ import annotations

import pytest
import torch

from molink import SamplingParams
from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.llm_engine import LLMEngine
from molink.runtime.wire_tensor import from_raw, to_raw
from tests.model.arch_checks import make_prompts

NUM_NEW_TOKENS = 16
THREE_STAGES = [(0, 1), (1, 3), (3, 4)]


def _engine(directory, stage_layers=None, wire_compression="none") -> LLMEngine:
    return LLMEngine(ModelConfig(model=str(directory), dtype="float32", device="cpu"),
                     CacheConfig(block_size=8), SchedulerConfig(max_num_seqs=8),
                     stage_layers, wire_compression=wire_compression)


def _greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    ids = [engine.add_request(None, prompt, params) for prompt in prompts]
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    return [list(finished[rid]) for rid in ids]


def test_uncompressed_hops_equal_one_stage(tiny_model_dir):
    directory = tiny_model_dir("llama")
    prompts = make_prompts(512, (5, 23, 40))
    expected = _greedy(_engine(directory), prompts)
    assert _greedy(_engine(directory, THREE_STAGES, "none"), prompts) == expected


def test_int8_hops_deliver_the_dequantized_activations(tiny_model_dir):
    engine = _engine(tiny_model_dir("llama"), [(0, 2), (2, 4)], "int8")
    first, second = engine.executors
    sent, received = [], []

    def record(executor, log, which):
        execute = executor.execute

        def wrapper(plan, hidden=None):
            result = execute(plan, hidden)
            log.append(result if which == "output" else hidden)
            return result
        executor.execute = wrapper

    record(first, sent, "output")
    record(second, received, "input")
    tokens = _greedy(engine, make_prompts(512, (5, 23)))

    assert [len(t) for t in tokens] == [NUM_NEW_TOKENS, NUM_NEW_TOKENS]
    assert len(sent) == len(received) > 1
    for out, got in zip(sent, received):
        assert got.dtype == second.dtype and got.shape == out.shape  # [T, hidden]
        assert torch.equal(got, from_raw(to_raw(out, "int8"), second.device))
    assert any(not torch.equal(got, out) for out, got in zip(sent, received))  # lossy


def test_unknown_wire_compression_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="wire_compression.*int8"):
        _engine(tiny_model_dir("llama"), THREE_STAGES, "fp8")
