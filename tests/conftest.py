"""Shared fixtures: tiny random models are built once per test session and reused."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from molink import envs

from tests.model_factory import build_model

# The tests run tiny models: one intra-op thread is several times faster than two for such
# small tensors, and it keeps timings stable on a shared 2-core machine.
torch.set_num_threads(1)

# Nodes keep their TLS identity in a state directory: the tests' nodes (and the stage
# processes they start, which inherit the environment) use one of their own, not ~/.local.
os.environ.setdefault(envs.STATE_DIR_VAR, tempfile.mkdtemp(prefix="molink-test-state-"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(name)`` -> directory of the tiny model ``name`` (built on first use)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_model(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get
