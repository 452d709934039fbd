"""The tokenizer of a model and its end-of-sequence ids.

``load_tokenizer`` (``model.tokenizer_files``, shared with the last stage, which compiles
grammars with it): a model directory's tokenizer files or a GGUF file's metadata, never
remote code.
"""

from __future__ import annotations

import logging

from molink.model.gguf import gguf_files
from molink.model.tokenizer_files import load_tokenizer

__all__ = ["eos_token_ids", "load_tokenizer"]

logger = logging.getLogger(__name__)


def eos_token_ids(tokenizer, arch_eos: tuple[int, ...], model_dir: str) -> frozenset[int]:
    """The end-of-sequence ids of a model: the one rule, used by every engine.

    The union, deduplicated, of config.json's ``eos_token_id`` (``arch_eos``: an id or a
    list), generation_config.json's ``eos_token_id`` (an id or a list; chat models list their
    end-of-turn token there) and the tokenizer's ``eos_token_id``. Generation stops at any
    of them, as in ``transformers.generate`` and vLLM; a file that lacks one adds nothing.
    """
    ids = set(arch_eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    if gguf_files(model_dir) is not None:
        return frozenset(int(i) for i in ids)  # a GGUF file has no generation_config.json
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model_dir)
        eos = gen.eos_token_id
        ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    except (OSError, ValueError):
        pass  # no generation_config.json: nothing to add
    return frozenset(int(i) for i in ids)
