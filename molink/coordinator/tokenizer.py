"""Loading the tokenizer and chat template of a model (never running remote code).

A model directory's tokenizer files, or, for a GGUF model (``molink.model.gguf``), the
``tokenizer.*`` metadata of its (first) file: vocabulary, merges, special tokens and chat
template, converted by ``transformers``.
"""

from __future__ import annotations

import logging

from molink.model.gguf import gguf_files

logger = logging.getLogger(__name__)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        files = gguf_files(path)
        if files is not None:
            return AutoTokenizer.from_pretrained(str(files[0].parent), gguf_file=files[0].name,
                                                 trust_remote_code=False)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"could not load a tokenizer from {path!r}: {exc}") from None


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
