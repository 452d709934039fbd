"""Every tiny model of the registry (``tiny_configs``) equals its reference (fp32, CPU).

Each entry goes through the held checks it names (``arch_checks``): prompt logits, layer
splits, greedy continuous batching in every scenario. Family files hold only what is
particular to a family.
"""

from __future__ import annotations

import json

import pytest

from molink.model.registry import registered_models
from tests.model.arch_checks import SCENARIOS, check_greedy, check_layer_split, check_prompt_logits
from tests.model.tiny_configs import TINY_MODELS, names_with


def test_every_registered_architecture_has_a_tiny_model():
    """A new architecture (a new row of the README's table) needs a registry entry."""
    covered = {entry.architecture for entry in TINY_MODELS.values()}
    assert set(registered_models()) - covered == set()
    assert covered - set(registered_models()) == set()  # no entry for a dropped one


@pytest.mark.parametrize("name", names_with("logits"))
def test_prompt_logits_equal_reference(name, tiny_model_dir):
    entry = TINY_MODELS[name]
    directory = tiny_model_dir(name)
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == [entry.architecture]  # the entry tests what it names
    check_prompt_logits(directory, entry.reference(directory), lengths=entry.logit_lengths)


@pytest.mark.parametrize("name", names_with("layer_split"))
def test_split_into_layer_ranges_keeps_logits(name, tiny_model_dir):
    entry = TINY_MODELS[name]
    directory = tiny_model_dir(name)
    check_layer_split(directory, entry.num_layers, entry.reference(directory).vocab_size)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", names_with("greedy"))
def test_greedy_continuous_batching_equals_reference(name, scenario, tiny_model_dir):
    entry = TINY_MODELS[name]
    directory = tiny_model_dir(name)
    options = {} if "num_kv_blocks" in SCENARIOS[scenario] else entry.llm_options
    llm = check_greedy(directory, entry.reference(directory), scenario, **options)
    for executor in llm.llm_engine.executors:
        if executor.state_cache is not None:
            # A slot is held exactly by the requests the executor holds (finished ones are
            # freed by the next plan, so the last few may still be there); preempted ones
            # gave theirs back.
            cache = executor.state_cache
            assert cache.num_slots - cache.num_free_slots == len(executor.requests)
