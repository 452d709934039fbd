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


def _built_on_first_use(tmp_path_factory, build):
    """``get(name)`` -> ``build(name, a fresh temp dir)``, built once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(name)`` -> directory of the tiny model ``name`` (built on first use)."""
    return _built_on_first_use(tmp_path_factory, build_model)


@pytest.fixture(scope="session")
def gguf_model(tmp_path_factory):
    """``gguf_model(name)`` -> path of ``tests.model.gguf_factory.MODELS[name]`` written as
    GGUF (built on first use; its Hugging Face directory beside it, in ``hf``)."""
    def make(name: str, root):
        from tests.model.gguf_factory import make_model  # needs the gguf package

        return make_model(name, root)

    return _built_on_first_use(tmp_path_factory, make)
