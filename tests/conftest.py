"""Shared fixtures: tiny random models are built once per test session and reused."""

from __future__ import annotations

import pytest

from tests.model_factory import build_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(name)`` -> directory of the tiny model ``name`` (built on first use)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_model(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get
