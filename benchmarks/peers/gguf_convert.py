"""The GGUF converter process: llama.cpp's ``convert_hf_to_gguf.py``, told our tokenizer.

    python -m benchmarks.peers.gguf_convert LLAMA_CPP_DIR -- CONVERTER_ARGS...

The benchmarks' random Llama carries a tiny byte-level BPE tokenizer (GPT-2 pre-tokenizer,
no ``tokenizer.model``). The converter would try SentencePiece first and then refuse a BPE
pre-tokenizer whose hash it does not know; the benchmark sends token ids, never text, so the
tokenizer only has to load. This process therefore imports the converter from
LLAMA_CPP_DIR (its own ``gguf-py`` first on the path), makes the Llama converter write the
vocabulary as GPT-2 BPE, and runs its ``main`` unchanged otherwise.

One more change, to the vocabulary's text only: a token whose bytes are not whole UTF-8
characters (a lone byte, half an emoji) gets an ASCII name instead. llama-server holds such a
token back until a later one completes the character, so the random model's output, full of
byte tokens, streamed in bursts: about half the events for as many tokens, a first event
late, and per-token times the client cannot see. MoLink streams one event per token either
way. The weights, the ids and every computation are unchanged.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes byte b as one printable character: b itself for the
    printable Latin-1 bytes, chr(256 + n) for the n-th other byte. -> character: byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable},
            **{chr(256 + n): b for n, b in enumerate(others)}}


def whole_characters(tokens: list[str]) -> list[str]:
    """``tokens`` (byte-level text), each one that is not whole UTF-8 characters renamed."""
    alphabet = byte_level_alphabet()
    renamed = []
    for token_id, token in enumerate(tokens):
        if all(ch in alphabet for ch in token):
            try:
                bytes(alphabet[ch] for ch in token).decode("utf-8")
            except UnicodeDecodeError:
                token = f"<partial-utf8-{token_id}>"
        renamed.append(token)
    return renamed


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m benchmarks.peers.gguf_convert LLAMA_CPP_DIR -- ARGS...",
              file=sys.stderr)
        return 2
    source = Path(argv[0])
    sys.path[:0] = [str(source / "gguf-py"), str(source)]
    from conversion import base, llama  # llama.cpp's converter package, from ``source``

    original_vocab = base.TextModel.get_vocab_base

    def get_vocab_base(self):
        tokens, toktypes, pre = original_vocab(self)
        return whole_characters(tokens), toktypes, pre

    base.TextModel.get_vocab_base = get_vocab_base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    llama.LlamaModel.set_vocab = base.TextModel._set_vocab_gpt2
    sys.argv = [str(source / "convert_hf_to_gguf.py"), *argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
