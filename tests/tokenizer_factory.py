"""Tiny tokenizers trained offline, for tests that need a real Hugging Face tokenizer.

Two flavours, trained in milliseconds on a fixed built-in corpus (English, punctuation,
digits, accented Latin, CJK, emoji), so every multi-byte UTF-8 case shows up:

* ``build_tokenizer`` -- byte-level BPE (GPT-2 / Llama-3 / Qwen style). Every token is a
  sequence of bytes, so a CJK character or an emoji is often split across several tokens.
* ``build_sentencepiece_tokenizer`` -- SentencePiece-style BPE (Llama-2 / Mistral style):
  words carry a leading "▁" for the space before them, characters missing from the vocab
  fall back to ``<0xNN>`` byte tokens, and the decoder strips the first leading space.

Both share the same special tokens, always at the same ids (``SPECIAL_TOKEN_IDS``), set
bos/eos/unk/pad on the tokenizer, carry a ChatML chat template, and never add bos/eos when
encoding. The size of the vocabulary is exactly ``vocab_size`` (checked, so a model config
can use ``vocab_size`` directly; ``len(tokenizer) == vocab_size``). Output is deterministic:
the same arguments write byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, UNK, PAD, IM_START, IM_END)
SPECIAL_TOKEN_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}  # ids 0..5

DEFAULT_VOCAB_SIZE = 512
NUM_BYTES = 256
# The smallest vocabularies: the special tokens, one token per byte and (SentencePiece only)
# one token per character kept in the alphabet.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTES
_SENTENCEPIECE_ALPHABET_SIZE = 120  # the rarer characters are left to the byte fallback
MIN_SENTENCEPIECE_VOCAB_SIZE = MIN_VOCAB_SIZE + _SENTENCEPIECE_ALPHABET_SIZE
# The largest vocabulary the built-in corpus supports merges for (checked by the tests).
MAX_VOCAB_SIZE = 2048

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(directory: str | Path,
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer, save it to ``directory`` and load it back.

    ``len(result) == vocab_size``; ids 0..5 are ``SPECIAL_TOKENS``, ids 6..261 the 256 bytes.
    """
    _check_vocab_size(vocab_size, MIN_VOCAB_SIZE)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return _save_and_reload(tokenizer, directory, vocab_size)


def build_sentencepiece_tokenizer(directory: str | Path,
                                  vocab_size: int = DEFAULT_VOCAB_SIZE
                                  ) -> PreTrainedTokenizerFast:
    """Train a SentencePiece-style BPE tokenizer with byte fallback, save it and load it back.

    ``len(result) == vocab_size``; ids 0..5 are ``SPECIAL_TOKENS``, ids 6..261 the byte tokens
    ``<0x00>``..``<0xFF>``. Rare characters (most emoji) are not in the vocabulary, so they
    encode as byte tokens.
    """
    _check_vocab_size(vocab_size, MIN_SENTENCEPIECE_VOCAB_SIZE)
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    draft = Tokenizer(models.BPE(unk_token=UNK))
    draft.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - NUM_BYTES,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=_SENTENCEPIECE_ALPHABET_SIZE,
        show_progress=False,
    )
    draft.train_from_iterator(corpus(), trainer=trainer)
    # The trainer cannot add byte-fallback tokens, so rebuild the model with them inserted
    # right after the special tokens, keeping the trained merges.
    trained = json.loads(draft.to_str())["model"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].__getitem__)
    byte_tokens = [f"<0x{b:02X}>" for b in range(NUM_BYTES)]
    ordered = [*SPECIAL_TOKENS, *byte_tokens, *pieces[len(SPECIAL_TOKENS):]]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(ordered)}, merges=merges,
                                     unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.pre_tokenizer = metaspace
    # Llama-2's decoder: "▁" -> " ", bytes -> text, join, drop the space before the first word.
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    return _save_and_reload(tokenizer, directory, vocab_size)


def corpus() -> list[str]:
    """The fixed training text: hand-written lines plus seeded combinations of them."""
    rng = random.Random(1234)
    words = " ".join(_LINES).split()
    lines = list(_LINES)
    for i in range(400):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
        lines.append(f"{i} + {i * 7 % 100} = {i + i * 7 % 100}; {i * 3.5:.2f}% of {i ** 2}.")
    return lines


def _check_vocab_size(vocab_size: int, low: int) -> None:
    if not low <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be in [{low}, {MAX_VOCAB_SIZE}], got {vocab_size}")


def _save_and_reload(tokenizer: Tokenizer, directory: str | Path,
                     vocab_size: int) -> PreTrainedTokenizerFast:
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        assert tokenizer.token_to_id(token) == token_id, token
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(directory))
    loaded = AutoTokenizer.from_pretrained(str(directory))
    if len(loaded) != vocab_size:
        raise AssertionError(f"trained {len(loaded)} tokens, wanted {vocab_size}")
    return loaded


_LINES = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "Large language models predict the next token, one step at a time.",
    "A stage serves a half-open range of layers: [start_layer, end_layer).",
    "Please stop at the end of the sentence. Stop! STOP? stop...",
    "She said: \"It's 9:45 a.m. on 2024-03-17, isn't it?\"",
    "Prices rose 12.5% in Q3 (from $1,024 to $1,152) -- see table #7.",
    "def add(a, b):\n    return a + b  # tabs\tand newlines\n",
    "{\"key\": [1, 2, 3], \"ok\": true, \"none\": null}",
    "Email me at someone@example.com or visit https://example.org/path?q=1&x=2.",
    "Café, naïve, résumé, façade, jalapeño, über, coöperate, Ångström, São Paulo.",
    "Crème brûlée and piñata at the fiancée's soirée in Zürich.",
    "Voilà: l'été à Paris, où les élèves étudient le français.",
    "Größe, Straße, Mädchen, schön; Dvořák, Łódź, İstanbul, Ærøskøbing.",
    "Привет, мир! Как дела? Ελληνικά: Καλημέρα κόσμε.",
    "你好，世界！今天天气很好。我们一起学习中文。",
    "大型语言模型可以生成文本，也可以回答问题。",
    "日本語のテキスト：こんにちは、元気ですか？東京は晴れです。",
    "한국어 문장: 안녕하세요, 만나서 반갑습니다.",
    "Emoji time 😀😃😄 🎉🎊 👍🏽 ❤️ 🚀 🤖 🐍 🍕 — mixed with text!",
    "Family: 👨‍👩‍👧‍👦, flags 🇺🇸 🇯🇵, math ∑ ∫ √ ≤ ≥ ≠ ∞ π, arrows → ← ↑ ↓.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1000 65536 3.14159 -7 +8 1e-5.",
    "Punctuation!? (parentheses) [brackets] {braces} <angles> 'quotes' `ticks` ~ ^ | \\ /",
    "Streaming text must never show half of a character or half of a stop string.",
    "The detokenizer keeps a small window of previous tokens to decode new ones.",
    "In the beginning was the word, and the word was tokenized.",
    "Once upon a time, there was a tiny model that could only count to ten.",
    "ababab abcabc aaaa bbbb cccc xyzzy foo bar baz qux quux.",
)
