"""The one front half: the in-process engine and the pipeline head see the same model the
same way (EOS ids, model length, the warning when the KV cache clamps the length)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

import pytest
from transformers import AutoTokenizer

from molink import SamplingParams
from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.llm_engine import LLMEngine
from molink.coordinator.pipeline_head import PipelineHead
from molink.transport.peers import PeerSecurity

EXTRA_EOS = 7  # an end-of-turn id only generation_config.json names
BLOCK_SIZE = 8
TOKEN = "frontend-test-token"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny llama, with a generation_config.json that adds an EOS id of its own."""
    directory = tmp_path_factory.mktemp("frontend") / "llama"
    shutil.copytree(tiny_model_dir("llama"), directory)
    config = json.loads((directory / "config.json").read_text())
    generation = {"eos_token_id": [config["eos_token_id"], EXTRA_EOS]}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def _model_config(model_dir, max_model_len):
    return ModelConfig(model=str(model_dir), dtype="float32", device="cpu",
                       max_model_len=max_model_len)


def _engine(model_dir, num_blocks: int, max_model_len=None) -> tuple[frozenset, int]:
    engine = LLMEngine(_model_config(model_dir, max_model_len),
                       CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks))
    return engine.eos_token_ids, engine.max_model_len


def _head(model_dir, num_blocks: int, max_model_len=None) -> tuple[frozenset, int]:
    async def run():
        head = PipelineHead(_model_config(model_dir, max_model_len),
                            CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks),
                            SchedulerConfig(), HeadConfig(head_layers=(0, 4)),
                            security=PeerSecurity.create(TOKEN))
        await head.start("127.0.0.1", 0)
        try:
            await head.wait_ready(60)
            request = head.frontend.make_request("r", "hello", SamplingParams(max_tokens=1))[1]
            return request.eos_token_ids, head.max_model_len
        finally:
            await head.stop()

    return asyncio.run(run())


def test_both_engines_agree_on_eos_ids_and_the_model_length(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # config.json + generation_config.json + the tokenizer, deduplicated.
    expected_eos = frozenset({config["eos_token_id"], EXTRA_EOS, tokenizer.eos_token_id})
    engine = _engine(model_dir, num_blocks=256)
    head = _head(model_dir, num_blocks=256)
    assert engine == head
    assert engine[0] == expected_eos
    assert engine[1] == min(config["max_position_embeddings"], 256 * BLOCK_SIZE)


def test_both_engines_warn_alike_when_the_kv_cache_clamps_the_length(model_dir, caplog):
    num_blocks = 3  # 24 tokens: less than the 64 asked for
    for build in (_engine, _head):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="molink.coordinator.frontend"):
            _, max_model_len = build(model_dir, num_blocks, max_model_len=64)
        assert max_model_len == num_blocks * BLOCK_SIZE
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                    and r.name == "molink.coordinator.frontend"]
        assert warnings == ["max_model_len 64 exceeds the KV cache capacity; using 24 tokens"]
