"""Auto micro-batching measures what its counts deliver: it falls back to one micro-batch
where overlap does not pay, keeps the model's choice where it does, and measures again
per load level (pure: a simulated pipeline whose rate per count is given)."""

from __future__ import annotations

import random

from molink.coordinator.microbatch_trials import (
    HOLD_S,
    MicrobatchTrials,
    candidates,
)


def run(trials: MicrobatchTrials, rate_of, model_choice: int, decoding: int, seconds: float,
        start: float = 0.0, count: int | None = None, noise: float = 0.02,
        plausible=lambda count: True, prefill_s: float = 0.0,
        in_force: list | None = None) -> tuple[int, float]:
    """Feed results as a pipeline running at ``rate_of(count)`` tokens per request-second
    would deliver them (one result per micro-batch per round); for the first ``prefill_s``
    seconds 4 requests are being prefilled, which halves every count's rate. ``in_force``
    collects (time, count). -> (count in force, time)."""
    rng = random.Random(0)
    count = count or model_choice
    now = start
    while now < start + seconds:
        prefilling = 4 if now < start + prefill_s else 0
        rate = rate_of(count) * rng.uniform(1 - noise, 1 + noise) / (2 if prefilling else 1)
        assert rate > 0
        per_result = -(-decoding // count)
        now += per_result / (rate * decoding)  # the time one micro-batch's tokens take
        count = trials.observe(count, per_result, decoding, model_choice, now, plausible,
                               prefilling)
        if in_force is not None:
            in_force.append((now, count))
    return count, now


def test_falls_back_to_one_microbatch_where_overlap_does_not_pay():
    """The model says 12 (its fit thinks more micro-batches are free); on shared cores
    every extra micro-batch costs: one measures best and is kept."""
    trials = MicrobatchTrials()
    count, _ = run(trials, lambda m: 12.0 - 0.4 * (m - 1), model_choice=12, decoding=32,
                   seconds=60)
    assert count == 1
    assert set(candidates(12)) == {12, 1, 3, 16}
    assert set(trials.rates[6]) == {12, 1, 3, 16, 2}  # the candidates, then 1's neighbour


def test_keeps_the_models_choice_where_overlap_pays():
    trials = MicrobatchTrials()
    count, _ = run(trials, lambda m: 4.0 * min(m, 8) - 0.6 * m, model_choice=8, decoding=64,
                   seconds=90)
    assert count == 8
    assert set(trials.rates[7]) == {8, 1, 3, 16, 6, 10}  # the candidates, then 8's neighbours


def test_tries_more_than_the_model_says():
    """The model under-fills (it leaves out what it cannot see per hop): twice its choice
    measures better and is used."""
    trials = MicrobatchTrials()
    count, _ = run(trials, lambda m: 3.0 * min(m, 8) - 0.5 * m, model_choice=4, decoding=64,
                   seconds=90)
    assert count == 8
    assert candidates(4, limit=3) == [4, 1, 2, 3]  # never more than there are requests


def test_climbs_to_a_count_the_candidates_miss():
    """The best count (5) is none of the first candidates (10, 1, 3, 16): the search
    climbs to it from the best of them."""
    trials = MicrobatchTrials()
    count, _ = run(trials, lambda m: 10.0 - 0.5 * abs(m - 5), model_choice=10, decoding=32,
                   seconds=120)
    assert count == 5


def test_a_decision_holds_at_its_load_level():
    """All counts measure the same (within noise): once decided, the count stays; no
    switching to and fro on noise."""
    trials = MicrobatchTrials()
    count, now = run(trials, lambda m: 10.0, model_choice=4, decoding=16, seconds=90)
    assert all(trials.observe(count, 2, 16, 4, now + 0.01 * i) == count for i in range(1, 200))


def test_each_load_level_is_measured_and_remembered():
    trials = MicrobatchTrials()
    rate = lambda m: 12.0 - 0.4 * (m - 1)
    count, now = run(trials, rate, model_choice=9, decoding=32, seconds=60)
    assert count == 1
    # a lighter load: a level of its own, measured afresh ...
    count, now = run(trials, lambda m: 5.0 * min(m, 4) - m, model_choice=4, decoding=6,
                     seconds=60, start=now, count=count)
    assert count == 4 and set(trials.rates) == {6, 3}
    # ... and back at the first level, its decision holds at once
    assert trials.observe(4, 1, 32, 9, now + 0.01) == 1


def test_measurements_are_redone_after_the_hold():
    trials = MicrobatchTrials()
    count, now = run(trials, lambda m: 12.0 - 0.4 * (m - 1), model_choice=9, decoding=32,
                     seconds=60)
    assert count == 1
    # the pipeline changed its character: now overlap pays
    count, _ = run(trials, lambda m: 2.0 * m, model_choice=9, decoding=32,
                   seconds=HOLD_S + 60, start=now, count=count)
    assert count == 16  # the best measured: twice the model's choice


def test_counts_the_model_knows_are_far_worse_are_not_tried():
    """Over slow links to GPUs the model predicts one micro-batch several times slower: a
    trial of it would cost more than it can find, so only plausible counts are measured."""
    trials = MicrobatchTrials()
    count, _ = run(trials, lambda m: 4.0 * min(m, 8) - 0.1 * m, model_choice=8, decoding=512,
                   seconds=120, plausible=lambda m: m >= 6)
    assert count == 8
    assert min(trials.rates[10]) >= 6  # neither 1 nor 3 (nor 5) was ever in force


def test_a_burst_of_prompts_does_not_count_against_the_first_count_measured():
    """A load level is reached while its prompts are still being prefilled (1.5 s, every
    count's rate halved meanwhile): the window of the model's choice waits for them, so 2
    (10 tokens per request-second) is compared with 1 (9.3) in plain decode, and kept."""
    trials = MicrobatchTrials()
    in_force: list = []
    count, _ = run(trials, lambda m: {1: 9.3, 2: 10.0}.get(m, 5.0), model_choice=2,
                   decoding=16, seconds=12, prefill_s=1.5, in_force=in_force,
                   plausible=lambda m: m <= 2)
    assert count == 2 and set(trials.rates[5]) == {1, 2}
    assert trials.rates[5][2] > trials.rates[5][1]
    assert all(m == 2 for t, m in in_force if t < 1.5)  # the burst: no switch, no window


def test_a_steady_mix_of_prompts_delays_a_window_by_at_most_the_settle_time():
    """Prompts always being prefilled (a busy server): each window waits its longest, then
    measures under the mix; the decision is still made, and right."""
    trials = MicrobatchTrials()
    count, _ = run(trials, lambda m: 12.0 - 0.4 * (m - 1), model_choice=12, decoding=32,
                     seconds=90, prefill_s=90)
    assert count == 1 and set(trials.rates[6]) == {12, 1, 3, 16, 2}
