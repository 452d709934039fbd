"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gguf_model(tmp_path_factory):
    """``get(name)``: the path of ``gguf_factory.MODELS[name]`` written as GGUF, built once
    per session (its Hugging Face directory beside it, in ``hf``)."""
    made = {}

    def get(name: str):
        from tests.model.gguf_factory import make_model  # needs the gguf package

        if name not in made:
            made[name] = make_model(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get
