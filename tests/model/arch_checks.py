"""The checks every architecture must pass against its reference (fp32, CPU).

``tests/model/test_architectures.py`` runs them over every entry of ``tiny_configs``:

* ``check_prompt_logits``: prompt logits equal the reference's (max abs error <= 1e-4),
  whole and computed in chunks through the paged KV cache;
* ``check_layer_split``: 2 and 3 consecutive layer ranges give the whole model's logits;
* ``check_greedy``: greedy 32 tokens for several prompts of different lengths, batched
  continuously, equal the reference's greedy continuation per prompt, in each ``SCENARIOS``
  setting (block sizes that do and do not divide the prompts, chunked prefill at a small
  budget, and a KV cache so small that preemption must happen — asserted).

The reference is ``transformers`` (``hf_reference``: logits of the forward, ``generate``) or,
for checkpoints ``transformers`` runs only with remote code, a plain-PyTorch forward
(``plain_reference``: greedy decoding recomputes the whole sequence for every token).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from molink import LLM, SamplingParams
from tests.model.helpers import load_stages, prompt_logits
from tests.model_factory import VOCAB_SIZE, load_hf

LOGIT_TOL = 1e-4
NUM_NEW_TOKENS = 32
# Lengths chosen so block sizes 4 and 16 divide some of them and not others.
PROMPT_LENGTHS = (1, 5, 16, 23, 40, 64, 7)

SCENARIOS = {
    "block16": {"block_size": 16},
    "block5-chunked8": {"block_size": 5, "max_num_batched_tokens": 8},
    "block4-preempt": {"block_size": 4, "num_kv_blocks": 40, "max_num_batched_tokens": 32},
}

Greedy = tuple[list[list[int]], list[list[int]]]  # (prompts, greedy continuations)


@dataclass(frozen=True)
class Reference:
    """What a tiny model must equal."""

    vocab_size: int  # prompts are drawn from [6, vocab_size)
    logits: Callable[[list[int]], torch.Tensor]  # prompt -> [len(prompt), vocab] fp32
    greedy: Callable[[], Greedy]  # PROMPT_LENGTHS prompts and their continuations


def make_prompts(vocab_size: int, lengths=PROMPT_LENGTHS, seed: int = 1234) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(6, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@functools.cache
def hf_greedy(directory, lengths=PROMPT_LENGTHS) -> Greedy:
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


@functools.cache
def hf_reference(directory: Path) -> Reference:
    """The ``transformers`` model saved in ``directory`` (loaded once per session)."""
    model = load_hf(directory)

    @torch.no_grad()
    def logits(prompt: list[int]) -> torch.Tensor:
        return model(torch.tensor([prompt])).logits[0].float()

    return Reference(model.config.vocab_size, logits, lambda: hf_greedy(directory))


@functools.cache
def plain_reference(forward: Callable[[Path], Callable], directory: Path) -> Reference:
    """``forward(directory)``: a plain forward (prompt -> logits); greedy recomputes it all."""
    logits = forward(directory)

    @functools.cache
    def greedy() -> Greedy:
        prompts = make_prompts(VOCAB_SIZE)
        return prompts, [_greedy_continuation(logits, p) for p in prompts]

    return Reference(VOCAB_SIZE, logits, greedy)


def _greedy_continuation(logits, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(NUM_NEW_TOKENS):
        ids.append(int(logits(ids)[-1].argmax()))
    return ids[len(prompt):]


def check_prompt_logits(directory, reference: Reference, lengths=(23, 40)) -> None:
    stages = load_stages(directory, [(0, None)])
    for prompt in make_prompts(reference.vocab_size, lengths):
        expected = reference.logits(prompt)
        whole = prompt_logits(stages, prompt)
        chunked = prompt_logits(stages, prompt, chunks=[3, 9, len(prompt) - 12])
        assert (whole - expected).abs().max().item() <= LOGIT_TOL
        assert (chunked - expected).abs().max().item() <= LOGIT_TOL


def check_layer_split(directory, num_layers: int, vocab_size: int, length: int = 40) -> None:
    (prompt,) = make_prompts(vocab_size, (length,))
    whole = prompt_logits(load_stages(directory, [(0, None)]), prompt)
    mid = num_layers // 2
    for ranges in ([(0, mid), (mid, None)], [(0, 1), (1, num_layers - 1), (num_layers - 1, None)]):
        split = prompt_logits(load_stages(directory, ranges), prompt)
        assert (split - whole).abs().max().item() <= 1e-5, ranges


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outputs]


def check_greedy(directory, reference: Reference, scenario: str, **llm_options) -> LLM:
    prompts, expected = reference.greedy()
    options = dict(SCENARIOS[scenario], **llm_options)
    llm = LLM(model=str(directory), dtype="float32", device="cpu", **options)
    assert greedy_tokens(llm, prompts) == expected
    if scenario.endswith("preempt"):
        assert llm.llm_engine.scheduler.num_preemptions > 0
    return llm
