"""Shared fixtures: tiny random models are built once per test session and reused."""

from __future__ import annotations

import pytest
import torch

from tests.model_factory import build_model

# The tests run tiny models: one intra-op thread is several times faster than two for such
# small tensors, and it keeps timings stable on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(name)`` -> directory of the tiny model ``name`` (built on first use)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_model(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get
