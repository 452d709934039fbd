"""Loading a model's tokenizer from its files (never running remote code).

A model directory's tokenizer files, or, for a GGUF model (``molink.model.gguf``), the
``tokenizer.*`` metadata of its (first) file: vocabulary, merges, special tokens and chat
template, converted by ``transformers``. The head reads it to tokenize prompts
(``coordinator.tokenizer``), the last stage to compile grammars (``runtime.guided``).
"""

from __future__ import annotations

from molink.model.gguf import gguf_files


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        files = gguf_files(path)
        if files is not None:
            return AutoTokenizer.from_pretrained(str(files[0].parent), gguf_file=files[0].name,
                                                 trust_remote_code=False)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 (what a third-party file makes the builders raise:
        # OSError, ValueError, KeyError, and the tokenizers library's bare Exception, e.g. a
        # GGUF vocabulary without the byte-level alphabet) -> one clear error, no traceback
        raise ValueError(f"could not load a tokenizer from {path!r}: {exc}") from None
