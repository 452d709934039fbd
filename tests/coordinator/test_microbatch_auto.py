"""What ``--num-microbatches auto`` measures: stage step times (fitted online) and which
stages share one machine's cores."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from molink.coordinator.hop_stats import HopStats
from molink.coordinator.microbatch_tuner import DECIDE_EVERY, MicrobatchTuner
from molink.scheduler.microbatch_chooser import StageFit
from molink.scheduler.stall_bound import prefill_chunk_tokens


def test_fit_recovers_fixed_and_per_token_cost_from_noisy_steps():
    rng = random.Random(0)
    fit = StageFit()
    for _ in range(64):
        tokens = rng.randint(8, 256)
        fit.add(tokens, (0.012 + 0.00008 * tokens) * rng.uniform(0.97, 1.03))
    timing = fit.timing()
    assert timing.fixed_s == pytest.approx(0.012, rel=0.15)
    assert timing.per_token_s == pytest.approx(0.00008, rel=0.15)


def test_fit_of_equal_sized_steps_predicts_their_time():
    fit = StageFit()
    for _ in range(10):
        fit.add(64, 0.02)
    assert fit.timing().step_s(64) == pytest.approx(0.02)


def test_fit_leaves_out_the_first_step():
    """A stage's first step pays one-time costs: left out, it cannot turn the slope negative
    (the second, larger step looked cheaper, and a prompt went unbounded)."""
    fit = StageFit()
    fit.add(5, 0.0021)  # the first step: warm-up
    fit.add(23, 0.0016)
    assert list(fit.samples) == [(23, 0.0016)]
    timing = fit.timing()  # one step size only: all of it counted per token (cautious)
    assert timing.fixed_s == 0.0 and timing.per_token_s == pytest.approx(0.0016 / 23)
    assert prefill_chunk_tokens([timing], 3, 2.0, 2048) < 64


def test_a_window_of_one_step_size_keeps_the_per_token_cost_it_showed_before():
    """Steady decode steps (one size) fill the window: the per-token cost measured while
    prompts went through is kept, so the next long prompt is still bounded."""
    fit = StageFit(window=16)
    fit.add(1, 1.0)  # warm-up
    for tokens in (16, 80, 16, 144, 16, 48):
        fit.add(tokens, 0.01 + 0.0002 * tokens)
    assert fit.timing().per_token_s == pytest.approx(0.0002)
    for _ in range(16):
        fit.add(16, 0.01 + 0.0002 * 16)
    timing = fit.timing()
    assert timing.per_token_s == pytest.approx(0.0002)
    assert timing.fixed_s == pytest.approx(0.01)
    # 2 * (0.01 / 0.0002 + 16) = 132 prompt tokens (less one for the fit's float rounding)
    assert 131 <= prefill_chunk_tokens([timing], 16, 2.0, 2048) <= 132


def test_fit_keeps_only_recent_steps():
    fit = StageFit(window=16)
    for _ in range(16):
        fit.add(32, 0.5)  # an old, slow regime
    for tokens in range(16, 32):
        fit.add(tokens, 0.01)
    assert fit.timing().step_s(24) == pytest.approx(0.01)


def test_stages_computing_on_one_machines_cpus_share_its_cores(tiny_model_dir):
    from molink.runtime.host import cpu_cores, cpu_set, host_id
    from tests.coordinator.pipeline_harness import make_head

    head = make_head(tiny_model_dir("llama"), (0, 2))
    member = head.membership.add(2, 4, "127.0.0.1:1", 256)
    member.host_id, member.device, member.cpu_cores = host_id(), "cpu", cpu_cores()
    assert head._shared_cores() == cpu_cores()  # head layers + stage on this machine's CPUs
    member.cpu_set = "9999"  # pinned to a CPU the head's process does not run on
    assert head._shared_cores() is None
    member.cpu_set = cpu_set()
    assert head._shared_cores() == cpu_cores()
    member.host_id = "another-machine"
    assert head._shared_cores() is None
    member.host_id, member.device = host_id(), "emulated"  # emulated: waits, uses no cores
    assert head._shared_cores() is None


def _tuner_over_slow_links(shared_cores):
    """Three stages of ~10 ms decode steps (+0.37 ms per token) behind 20 ms, 100 Mbit/s
    hops, as measured: the tuner's model has decided for 30 requests."""
    tuner = MicrobatchTuner()
    for tokens in [1, 10, 30, 64, 128, 5, 20, 40] * 2:
        tuner.record(SimpleNamespace(num_tokens=tokens), (0.010 + 0.00037 * tokens,) * 3)
    hops = [HopStats(f"hop {i}", 100e6, 0.020, 10240 * 1000, 100, 1000, "none")
            for i in range(3)]
    for _ in range(DECIDE_EVERY):
        tuner.update(hops, 30, shared_cores, tokens=10, decoding=30)
    return tuner


def test_the_prefill_budget_follows_the_round_where_links_set_it():
    """Stages on their own devices: a chunk may take the round's share (links make the
    round ~10x a step); stages sharing one machine's cores keep the step unit."""
    apart, shared = _tuner_over_slow_links(None), _tuner_over_slow_links(2)
    assert apart.model_choice is not None and shared.model_choice is not None
    by_steps = 2 * int(0.010 / 0.00037 + 10)  # 3 micro-batches of 10 decodes: factor 2 steps
    assert shared.prefill_budget(2.0, 30, 3, 2048) == pytest.approx(by_steps, abs=2)
    # the modelled round of 3 micro-batches of 10: 3 steps of 13.7 ms + 3 x 20 ms + 3 x 10
    # rows of 10 KiB at 100 Mbit/s (8.2 ms) = 125.8 ms; half a stage's share: 21 ms of
    # prompt tokens at 0.37 ms = 56.7, times the factor 2
    assert apart.prefill_budget(2.0, 30, 3, 2048) == pytest.approx(113, abs=2)
    assert apart.prompt_tokens_allowed == apart.prefill_budget(2.0, 30, 3, 2048)
