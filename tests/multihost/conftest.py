"""The model every multi-host test serves."""

from __future__ import annotations

import pytest

from tests.model_factory import build_model
from tests.multihost.test_multihost import LONG, PROMPT_IDS


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """The tiny 40-layer model and the greedy tokens transformers gives for the prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = build_model("llama", tmp_path_factory.mktemp("llama40"), num_hidden_layers=40,
                            hidden_size=32, intermediate_size=64)
    hf = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    ids = hf.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=LONG["max_tokens"],
                      do_sample=False, min_new_tokens=LONG["max_tokens"])[0, len(PROMPT_IDS):]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return directory, tokenizer, ids.tolist()
