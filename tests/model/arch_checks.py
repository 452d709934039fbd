"""The checks every architecture must pass against ``transformers`` (fp32, CPU).

Each architecture's test module builds a tiny random model directory and calls these:

* ``check_prompt_logits``: prompt logits equal HF logits (max abs error <= 1e-4), whole
  and computed in chunks through the paged KV cache;
* ``check_layer_split``: 2 and 3 consecutive layer ranges give the whole model's logits;
* ``check_greedy``: greedy 32 tokens for several prompts of different lengths, batched
  continuously, equal HF ``generate`` per prompt, in each ``SCENARIOS`` setting (block
  sizes that do and do not divide the prompts, chunked prefill at a small budget, and a
  KV cache so small that preemption must happen — asserted).
"""

from __future__ import annotations

import functools

import torch

from molink import LLM, SamplingParams
from tests.model.helpers import load_stages, prompt_logits
from tests.model_factory import load_hf

LOGIT_TOL = 1e-4
NUM_NEW_TOKENS = 32
# Lengths chosen so block sizes 4 and 16 divide some of them and not others.
PROMPT_LENGTHS = (1, 5, 16, 23, 40, 64, 7)

SCENARIOS = {
    "block16": dict(block_size=16),
    "block5-chunked8": dict(block_size=5, max_num_batched_tokens=8),
    "block4-preempt": dict(block_size=4, num_kv_blocks=40, max_num_batched_tokens=32),
}


def make_prompts(vocab_size: int, lengths=PROMPT_LENGTHS, seed: int = 1234) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(6, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@functools.lru_cache(maxsize=None)
def hf_greedy(directory, lengths=PROMPT_LENGTHS) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, HF greedy continuations generated one prompt at a time); cached per model."""
    model = load_hf(directory)
    model.generation_config.eos_token_id = None  # exactly NUM_NEW_TOKENS tokens
    prompts = make_prompts(model.config.vocab_size, lengths)
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS,
                                 do_sample=False, pad_token_id=3)
            expected.append(out[0, len(prompt):].tolist())
    return prompts, expected


def check_prompt_logits(directory, lengths=(23, 40)) -> None:
    hf_model = load_hf(directory)
    stages = load_stages(directory, [(0, None)])
    for prompt in make_prompts(hf_model.config.vocab_size, lengths):
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt])).logits[0].float()
        whole = prompt_logits(stages, prompt)
        chunked = prompt_logits(stages, prompt, chunks=[3, 9, len(prompt) - 12])
        assert (whole - expected).abs().max().item() <= LOGIT_TOL
        assert (chunked - expected).abs().max().item() <= LOGIT_TOL


def check_layer_split(directory, num_layers: int, length: int = 40) -> None:
    hf_vocab = load_hf(directory).config.vocab_size
    (prompt,) = make_prompts(hf_vocab, (length,))
    whole = prompt_logits(load_stages(directory, [(0, None)]), prompt)
    mid = num_layers // 2
    for ranges in ([(0, mid), (mid, None)], [(0, 1), (1, num_layers - 1), (num_layers - 1, None)]):
        split = prompt_logits(load_stages(directory, ranges), prompt)
        assert (split - whole).abs().max().item() <= 1e-5, ranges


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outputs]


def check_greedy(directory, scenario: str, **llm_options) -> LLM:
    prompts, expected = hf_greedy(directory)
    options = dict(SCENARIOS[scenario], **llm_options)
    llm = LLM(model=str(directory), dtype="float32", device="cpu", **options)
    assert greedy_tokens(llm, prompts) == expected
    if scenario.endswith("preempt"):
        assert llm.llm_engine.scheduler.num_preemptions > 0
    return llm
