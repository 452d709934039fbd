"""What ``--num-microbatches auto`` measures: stage step times (fitted online) and which
stages share one machine's cores."""

from __future__ import annotations

import random

import pytest

from molink.scheduler.microbatch_chooser import StageFit


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


def test_fit_keeps_only_recent_steps():
    fit = StageFit(window=16)
    for _ in range(16):
        fit.add(32, 0.5)  # an old, slow regime
    for tokens in range(16, 32):
        fit.add(tokens, 0.01)
    assert fit.timing().step_s(24) == pytest.approx(0.01)


def test_stages_computing_on_one_machines_cpus_share_its_cores(tiny_model_dir):
    from molink.runtime.host import cpu_cores, host_id
    from tests.coordinator.pipeline_harness import make_head

    head = make_head(tiny_model_dir("llama"), (0, 2))
    member = head.membership.add(2, 4, "127.0.0.1:1", 256)
    member.host_id, member.device, member.cpu_cores = host_id(), "cpu", cpu_cores()
    assert head._shared_cores() == cpu_cores()  # head layers + stage on this machine's CPUs
    member.host_id = "another-machine"
    assert head._shared_cores() is None
    member.host_id, member.device = host_id(), "emulated"  # emulated: waits, uses no cores
    assert head._shared_cores() is None
