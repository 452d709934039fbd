"""Sampler tests: each knob changes exactly the rows that ask for it, and seeds are stable.

Distribution checks draw thousands of seeded rows in one call, so they are deterministic.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from molink.runtime.sampler import (
    Sampler,
    SamplingRequestState,
    apply_penalties,
    top_k_top_p_candidates,
    sample_inverse_cdf,
    seeded_uniform,
)
from molink.sampling_params import SamplingParams

EOS = 3
PROBS = [0.5, 0.3, 0.15, 0.05]  # hand-made distribution for support checks


def state(prompt=(), output=(), eos=(EOS,), **params) -> SamplingRequestState:
    return SamplingRequestState(SamplingParams(**params), list(prompt), list(output), frozenset(eos))


def log_probs_row(probs=PROBS) -> torch.Tensor:
    return torch.tensor(probs).log()  # [vocab_size]


def draw_many(row: torch.Tensor, num_draws: int, **params) -> torch.Tensor:
    """Samples `row` once per seed 0..num_draws-1 in one batch; returns [num_draws] token ids."""
    logits = row.expand(num_draws, -1).clone()  # [num_draws, vocab_size]
    states = [state(seed=seed, **params) for seed in range(num_draws)]
    return torch.tensor(Sampler(seed=0)(logits, states).token_ids)


def support(tokens: torch.Tensor) -> set[int]:
    return set(tokens.tolist())


# --- greedy ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = Sampler()(logits, [state(temperature=0.0) for _ in range(16)])
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert out.logprobs == [None] * 16


def test_top_k_one_is_greedy_even_with_temperature():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    out = Sampler()(logits, [state(temperature=1.5, top_k=1, logprobs=0) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()


# --- random sampling ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_softmax(temperature):
    num_draws = 10_000
    row = torch.tensor([1.0, 0.5, 0.0, -1.0])
    tokens = draw_many(row, num_draws, temperature=temperature)
    expected = (row / temperature).softmax(-1)
    freq = torch.bincount(tokens, minlength=4).float() / num_draws
    sigma = (expected * (1 - expected) / num_draws).sqrt()
    assert torch.all((freq - expected).abs() < 5 * sigma), (freq, expected)


def test_unseeded_rows_follow_softmax_and_vary():
    num_draws = 20_000
    row = torch.tensor([0.0, 1.0, 2.0])
    logits = row.expand(num_draws, -1).clone()
    tokens = torch.tensor(Sampler(seed=1)(logits, [state() for _ in range(num_draws)]).token_ids)
    expected = row.softmax(-1)
    freq = torch.bincount(tokens, minlength=3).float() / num_draws
    assert torch.all((freq - expected).abs() < 5 * (expected * (1 - expected) / num_draws).sqrt())


def test_unseeded_rows_reproducible_from_sampler_seed():
    logits = torch.zeros(200, 100)
    states = [state() for _ in range(200)]
    assert Sampler(seed=7)(logits, states).token_ids == Sampler(seed=7)(logits, states).token_ids
    assert Sampler(seed=7)(logits, states).token_ids != Sampler(seed=8)(logits, states).token_ids


def test_top_k_restricts_support_and_renormalises():
    num_draws = 5000
    tokens = draw_many(log_probs_row(), num_draws, top_k=2)
    assert support(tokens) == {0, 1}
    freq = (tokens == 0).float().mean().item()
    assert abs(freq - 0.625) < 5 * math.sqrt(0.625 * 0.375 / num_draws)


@pytest.mark.parametrize("top_p, expected", [(0.4, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}),
                                             (0.96, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, expected):
    # Cumulative mass 0.5, 0.8, 0.95, 1.0: the kept prefix is the first to reach top_p.
    assert support(draw_many(log_probs_row(), 3000, top_p=top_p)) == expected


def test_top_k_then_top_p_renormalises():
    # After top_k=2 the masses are 0.625, 0.375: top_p=0.6 keeps only token 0.
    assert support(draw_many(log_probs_row(), 2000, top_k=2, top_p=0.6)) == {0}
    assert support(draw_many(log_probs_row(), 2000, top_k=2, top_p=0.7)) == {0, 1}


@pytest.mark.parametrize("min_p, expected", [(0.05, {0, 1, 2, 3}), (0.2, {0, 1, 2}),
                                             (0.5, {0, 1}), (0.9, {0})])
def test_min_p_keeps_tokens_above_fraction_of_max(min_p, expected):
    # Threshold min_p * 0.5 against probabilities 0.5, 0.3, 0.15, 0.05.
    assert support(draw_many(log_probs_row(), 3000, min_p=min_p)) == expected


def test_min_p_applies_after_temperature():
    # min_p runs after temperature (vLLM): at temperature 2 the probs flatten and more pass.
    assert support(draw_many(log_probs_row(), 3000, temperature=2.0, min_p=0.5)) == {0, 1, 2}


@pytest.mark.parametrize("top_k, top_p", [(10, 1.0), (500, 0.9), (50, 0.5), (500, 0.3),
                                          (20, 0.8)])
def test_top_k_top_p_match_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(3)) * 3
    weights, token_ids = top_k_top_p_candidates(logits, [top_k] * 6, torch.full((6,), top_p))
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, token_ids, weights > 0)
    theirs = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, logits.clone()))
    assert torch.equal(kept, torch.isfinite(theirs))


def test_top_k_top_p_candidates_with_mixed_rows():
    logits = log_probs_row().expand(3, -1).clone()
    weights, token_ids = top_k_top_p_candidates(logits, [2, 4, 4], torch.tensor([1.0, 0.7, 1.0]))
    assert token_ids.tolist() == [[0, 1, 2, 3]] * 3
    assert (weights > 0).tolist() == [[True, True, False, False], [True, True, False, False],
                                      [True, True, True, True]]
    weights, token_ids = top_k_top_p_candidates(logits, [1, 3, 2], torch.tensor([1.0, 0.9, 0.6]))
    assert token_ids.shape == (3, 3)  # only the largest k is sorted
    assert (weights > 0).tolist() == [[True, False, False], [True, True, True],
                                      [True, False, False]]


def test_rows_with_different_params_behave_independently():
    row = log_probs_row()
    logits = row.expand(4, -1).clone()
    states = [state(temperature=0.0), state(top_k=2, seed=1), state(min_p=0.9, seed=2),
              state(top_p=0.4, seed=3)]
    for step in range(50):
        for s in states:
            s.output_token_ids.append(0)
        tokens = Sampler()(logits, states).token_ids
        assert tokens[0] == 0 and tokens[1] in (0, 1) and tokens[2] == 0 and tokens[3] == 0


def test_inverse_cdf_never_draws_zero_weight_columns():
    weights = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(6, -1)
    uniforms = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.9999999, 1.0 - 2**-24])
    assert sample_inverse_cdf(weights, uniforms).tolist() == [1, 1, 3, 3, 3, 3]
    # A target rounded up to the total still lands on the last positive column.
    assert sample_inverse_cdf(weights[:1] * 3, torch.tensor([1.0])).tolist() == [3]


# --- seeds ----------------------------------------------------------------------------


def step_logits(step: int, num_rows: int, vocab_size: int = 64) -> torch.Tensor:
    """Logits that change with the step, the same for every row."""
    row = torch.randn(vocab_size, generator=torch.Generator().manual_seed(step))
    return row.expand(num_rows, -1).clone()


def decode(sampler: Sampler, seed: int, num_steps: int, others: int = 0, shuffle: int = 0):
    """Generates `num_steps` tokens for one seeded request, batched with `others` rows."""
    rng = random.Random(shuffle)
    mine = state(seed=seed, top_p=0.95)
    companions = [state(temperature=t, top_k=k, seed=s)
                  for t, k, s in zip([0.5, 1.0, 0.0, 2.0] * others, [0, 5, 0, -1] * others,
                                     [None, 11, None, 12] * others)][:others]
    for step in range(num_steps):
        batch = [mine] + companions
        rng.shuffle(batch)
        tokens = sampler(step_logits(step, len(batch)), batch).token_ids
        mine.output_token_ids.append(tokens[batch.index(mine)])
    return mine.output_token_ids


def test_seeded_row_reproducible_run_to_run():
    assert decode(Sampler(seed=1), 42, 40) == decode(Sampler(seed=2), 42, 40)


def test_seeded_row_independent_of_batch_composition_and_order():
    alone = decode(Sampler(seed=1), 42, 40)
    assert decode(Sampler(seed=5), 42, 40, others=7, shuffle=1) == alone
    assert decode(Sampler(seed=9), 42, 40, others=3, shuffle=2) == alone


def test_different_seeds_differ():
    runs = {tuple(decode(Sampler(), seed, 20)) for seed in range(10)}
    assert len(runs) == 10


def test_seeded_row_draws_fresh_randomness_each_step():
    logits = torch.zeros(1, 1000)
    s = state(seed=42)
    sampler = Sampler()
    for _ in range(20):
        s.output_token_ids.append(sampler(logits, [s]).token_ids[0])
    assert len(set(s.output_token_ids)) > 15


def test_seeded_uniform_is_uniform_and_depends_on_both_keys():
    values = torch.tensor([seeded_uniform(seed, step) for seed in range(-50, 50) for step in range(50)])
    assert values.min() >= 0 and values.max() < 1
    assert abs(values.mean().item() - 0.5) < 0.02
    assert len(set(values.tolist())) == len(values)


# --- penalties ------------------------------------------------------------------------


def test_penalties_match_hand_computed_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    out = apply_penalties(logits, [[0, 1]], [[2, 2, 3]],
                          torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    # token 0: prompt, positive -> 2/2. token 1: prompt, negative -> -1*2.
    # token 2: output x2 -> 0.5/2 - 0.5*2 - 0.25. token 3: output x1 -> 3/2 - 0.5 - 0.25.
    expected = torch.tensor([[1.0, -2.0, 0.25 - 1.0 - 0.25, 1.5 - 0.5 - 0.25, -2.0]])
    torch.testing.assert_close(out, expected)


def test_frequency_and_presence_ignore_prompt_tokens():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    out = apply_penalties(logits, [[0, 0]], [[1]],
                          torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.0]))
    torch.testing.assert_close(out, torch.tensor([[1.0, -1.0, 1.0]]))


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 100, generator=gen)  # [num_rows, vocab_size]
    prompts = [torch.randint(0, 100, (n,), generator=gen).tolist() for n in (5, 0, 30)]
    outputs = [torch.randint(0, 100, (n,), generator=gen).tolist() for n in (7, 4, 0)]
    ours = apply_penalties(logits, prompts, outputs, torch.full((3,), penalty),
                           torch.zeros(3), torch.zeros(3))
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    for i in range(3):
        ids = torch.tensor([prompts[i] + outputs[i]], dtype=torch.long)
        theirs = processor(ids, logits[i:i + 1].clone()) if ids.numel() else logits[i:i + 1]
        torch.testing.assert_close(ours[i:i + 1], theirs)


def test_penalties_change_only_their_rows_in_sampler():
    logits = torch.tensor([[3.0, 2.9, 0.0]]).expand(2, -1).clone()
    states = [state(temperature=0.0, output=[0], frequency_penalty=1.0),
              state(temperature=0.0, output=[0])]
    assert Sampler()(logits, states).token_ids == [1, 0]


# --- min_tokens -----------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_tokens_then_stops():
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 4.0]])  # EOS=3 best, stop token 4 next
    def greedy_at(num_output: int) -> int:
        s = state(output=[1] * num_output, temperature=0.0, min_tokens=3, stop_token_ids=[4])
        return Sampler()(logits, [s]).token_ids[0]
    assert [greedy_at(n) for n in range(5)] == [2, 2, 2, 3, 3]


def test_min_tokens_masks_eos_even_with_ignore_eos():
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    s = state(temperature=0.0, min_tokens=1, ignore_eos=True)
    assert Sampler()(logits, [s]).token_ids == [2]


def test_min_tokens_masks_sampled_rows():
    tokens = draw_many(torch.tensor([0.0, 0.0, 0.0, 3.0]), 500, min_tokens=1)
    assert EOS not in support(tokens)


def test_all_masked_row_falls_back_to_raw_argmax():
    logits = torch.tensor([[0.0, 2.0, 1.0]]).expand(2, -1).clone()
    states = [state(eos=(0, 1, 2), min_tokens=1, temperature=0.0),
              state(eos=(0, 1, 2), min_tokens=1, seed=0)]
    assert Sampler()(logits, states).token_ids == [1, 1]


# --- logprobs -------------------------------------------------------------------------


def test_logprobs_come_from_raw_logits():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 300, generator=gen)
    states = [state(logprobs=5, temperature=0.3, repetition_penalty=1.5, output=[1, 2]),
              state(logprobs=0, seed=3),
              state(),
              state(logprobs=20, temperature=0.0, top_k=3)]
    out = Sampler(seed=0)(logits, states)
    expected = logits.log_softmax(-1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        token = out.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(expected[i, token].item(), abs=1e-5)
        assert lp.rank == int((expected[i] > expected[i, token]).sum()) + 1
        assert len(lp.top) == states[i].params.logprobs
        top_ids = expected[i].argsort(descending=True)[:len(lp.top)].tolist()
        assert [t for t, _ in lp.top] == top_ids
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        for t, v in lp.top:
            assert v == pytest.approx(expected[i, t].item(), abs=1e-5)
    assert out.logprobs[3].rank == 1


def test_logprobs_rank_of_unlikely_token():
    logits = torch.tensor([[0.0, 3.0, 2.0, -math.inf, 1.0]])
    s = state(logprobs=2, eos=(1, 2), min_tokens=1, temperature=0.0)
    lp = Sampler()(logits, [s]).logprobs[0]
    assert (lp.token_id, lp.rank) == (4, 3)
    assert [t for t, _ in lp.top] == [1, 2]


def test_logprobs_capped_by_vocab_size():
    out = Sampler()(torch.zeros(1, 3), [state(logprobs=10, temperature=0.0)])
    assert len(out.logprobs[0].top) == 3
