"""Every supported architecture equals Hugging Face ``transformers`` (fp32, CPU).

Tiny random-weight models are built from each architecture's config class, saved with
``save_pretrained`` and loaded through MoLink's real loader.
"""

from __future__ import annotations

import pytest
import torch

from molink import LLM, SamplingParams
from tests.model.helpers import load_stages, prompt_logits
from tests.model_factory import load_hf

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
LOGIT_TOL = 1e-4
NUM_NEW_TOKENS = 32
# Prompt lengths chosen so block sizes 4 and 16 divide some of them and not others.
PROMPT_LENGTHS = [1, 5, 16, 23, 40, 64, 7]


def _prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(6, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def hf_reference(tiny_model_dir):
    """Per architecture: HF model, prompts, and HF greedy continuations (one prompt at a time)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            directory = tiny_model_dir(arch)
            model = load_hf(directory)
            model.generation_config.eos_token_id = None  # generate exactly NUM_NEW_TOKENS
            prompts = _prompts(model.config.vocab_size)
            expected = []
            with torch.no_grad():
                for prompt in prompts:
                    out = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS,
                                         do_sample=False, pad_token_id=3)
                    expected.append(out[0, len(prompt):].tolist())
            cache[arch] = (directory, model, prompts, expected)
        return cache[arch]

    return get


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_equal_transformers(arch, hf_reference):
    directory, hf_model, prompts, _ = hf_reference(arch)
    stages = load_stages(directory, [(0, None)])
    for prompt in prompts[3:5]:
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        whole = prompt_logits(stages, prompt)
        chunked = prompt_logits(stages, prompt, chunks=[3, 9, len(prompt) - 12])
        assert (whole - expected).abs().max().item() <= LOGIT_TOL
        assert (chunked - expected).abs().max().item() <= LOGIT_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_split_into_layer_ranges_keeps_logits(arch, hf_reference):
    directory, _, prompts, _ = hf_reference(arch)
    prompt = prompts[4]
    whole = prompt_logits(load_stages(directory, [(0, None)]), prompt)
    for ranges in ([(0, 2), (2, None)], [(0, 1), (1, 3), (3, 4)]):
        split = prompt_logits(load_stages(directory, ranges), prompt)
        assert (split - whole).abs().max().item() <= 1e-5, ranges


SCENARIOS = {
    # name: LLM options
    "block16": dict(block_size=16),
    "block5-chunked8": dict(block_size=5, max_num_batched_tokens=8),
    "block4-preempt": dict(block_size=4, num_kv_blocks=40, max_num_batched_tokens=32),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuous_batching_equals_transformers_generate(arch, scenario, hf_reference):
    directory, _, prompts, expected = hf_reference(arch)
    llm = LLM(model=str(directory), dtype="float32", device="cpu", **SCENARIOS[scenario])
    assert _greedy(llm, prompts) == expected
    if scenario.endswith("preempt"):
        assert llm.llm_engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chained_layer_ranges_generate_the_same_tokens(arch, hf_reference):
    directory, _, prompts, expected = hf_reference(arch)
    llm = LLM(model=str(directory), dtype="float32", device="cpu", block_size=8,
              stage_layers=[(0, 1), (1, 3), (3, 4)])
    assert _greedy(llm, prompts) == expected
