"""IncrementalDetokenizer and StopStringMatcher against ``tokenizer.decode`` and brute force.

Tokenizers are trained offline (tests/tokenizer_factory.py): a byte-level BPE, where CJK
characters and emoji are split across tokens, and a SentencePiece-style BPE, where words
carry their leading space ("▁") and rare characters fall back to byte tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from molink.coordinator.detokenizer import IncrementalDetokenizer, StopStringMatcher
from tests.tokenizer_factory import (
    MAX_VOCAB_SIZE,
    MIN_SENTENCEPIECE_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKEN_IDS,
    build_sentencepiece_tokenizer,
    build_tokenizer,
    corpus,
)

FFFD = "\ufffd"
EOS_ID = SPECIAL_TOKEN_IDS["</s>"]
IM_END_ID = SPECIAL_TOKEN_IDS["<|im_end|>"]

# Texts the tokenizers were not trained on, so multi-byte characters split across tokens.
TEXTS = (
    "Hello, world! 😀 How are you?",
    "你好，世界！我们一起学习中文。大型语言模型。",
    "日本語のテキスト：こんにちは、元気ですか？",
    "Café naïve résumé jalapeño Ångström Dvořák Łódź",
    "Emoji: 🤖🐍🍕🚀 👨‍👩‍👧‍👦 🇺🇸 ❤️ 👍🏽 — done.",
    "Mixed 混合 text ✨ with 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ∑∫√ symbols 🎉!",
    "def f(x):\n    return x ** 2  # 平方 😎\n",
    "   leading spaces, trailing spaces   ",
    "A  double  space and\ttabs\n\nnew lines",
)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("byte_bpe"))


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    return build_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp_bpe"), vocab_size=1024)


def stream(tokenizer, prompt_ids, output_ids, *, group_sizes=None, skip_special_tokens=True):
    """Feed ``output_ids`` in groups; returns the pieces and the flushed tail."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    pieces, i = [], 0
    while i < len(output_ids):
        n = 1 if group_sizes is None else next(group_sizes)
        pieces.append(detok.add_tokens(output_ids[i:i + n]))
        assert detok.text == "".join(pieces)
        i += n
    tail = detok.flush()
    assert detok.text == "".join(pieces) + tail
    return pieces, tail


def random_groups(rng):
    while True:
        yield rng.randint(1, 7)


def with_specials(rng, ids, allowed=lambda position: True):
    """Insert a few special tokens at random allowed positions."""
    ids = list(ids)
    positions = [i for i in range(len(ids) + 1) if allowed(i)]
    for position in sorted(rng.sample(positions, min(len(positions), rng.randint(0, 3))),
                           reverse=True):
        ids.insert(position, rng.choice([EOS_ID, IM_END_ID]))
    return ids


def byte_level_cases(tokenizer, rng):
    """(prompt ids, output ids): encoded texts, cut at random tokens, and random ids."""
    texts = [*TEXTS, *corpus()[:20]]
    cases = []
    for text in texts:
        ids = tokenizer.encode(text)
        cases.append(([], ids))
        cut = rng.randint(0, len(ids))  # ends mid-character about as often as not
        cases.append((ids[:rng.randint(0, 8)], with_specials(rng, ids[:cut])))
    for _ in range(60):
        cases.append((rng.choices(range(len(tokenizer)), k=rng.randint(0, 8)),
                      rng.choices(range(len(tokenizer)), k=rng.randint(1, 40))))
    return cases


# ---- IncrementalDetokenizer, byte-level BPE ---------------------------------------------


def test_factory_splits_characters_across_tokens(byte_tokenizer):
    """Guard: the cases below only mean something if tokens end inside characters."""
    ids = byte_tokenizer.encode("".join(TEXTS))
    assert sum(FFFD in byte_tokenizer.decode([i]) for i in ids) > 20


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_byte_level_pieces_concatenate_to_decode(byte_tokenizer, skip_special_tokens):
    rng = random.Random(0)
    for prompt_ids, output_ids in byte_level_cases(byte_tokenizer, rng):
        expected = byte_tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
        for groups in (None, random_groups(rng)):
            pieces, tail = stream(byte_tokenizer, prompt_ids, output_ids, group_sizes=groups,
                                  skip_special_tokens=skip_special_tokens)
            assert "".join(pieces) + tail == expected, (prompt_ids, output_ids)


def test_byte_level_emits_each_character_as_soon_as_complete(byte_tokenizer):
    """After every token the text equals decode(output so far), unless that ends inside a
    character: then the text is that decode minus its trailing U+FFFD, never broken UTF-8."""
    rng = random.Random(1)
    for prompt_ids, output_ids in byte_level_cases(byte_tokenizer, rng):
        detok = IncrementalDetokenizer(byte_tokenizer, prompt_ids)
        for n in range(1, len(output_ids) + 1):
            piece = detok.add_tokens([output_ids[n - 1]])
            so_far = byte_tokenizer.decode(output_ids[:n], skip_special_tokens=True)
            if not so_far.endswith(FFFD):
                assert detok.text == so_far
            else:
                assert so_far.startswith(detok.text)
                assert not piece.endswith(FFFD)


def test_valid_text_never_yields_replacement_chars(byte_tokenizer):
    rng = random.Random(2)
    for text in TEXTS:
        ids = byte_tokenizer.encode(text)
        for groups in (None, random_groups(rng)):
            pieces, tail = stream(byte_tokenizer, [], ids, group_sizes=groups)
            assert all(FFFD not in piece for piece in pieces)
            assert "".join(pieces) == text and tail == ""
        # A token-by-token decode, the naive approach, does emit broken characters.
        assert any(FFFD in byte_tokenizer.decode([i]) for i in ids) or text.isascii()


def test_prompt_ending_inside_a_character(byte_tokenizer):
    ids = byte_tokenizer.encode("prompt 🤖🚀 output 你好 😀")
    split = next(i for i in range(1, len(ids))
                 if byte_tokenizer.decode(ids[:i]).endswith(FFFD))
    pieces, tail = stream(byte_tokenizer, ids[:split], ids[split:])
    assert "".join(pieces) + tail == byte_tokenizer.decode(ids[split:])


def test_prompt_of_only_special_tokens(byte_tokenizer):
    ids = byte_tokenizer.encode("Hi 😀")
    pieces, tail = stream(byte_tokenizer, [IM_END_ID, EOS_ID, 0], ids)
    assert "".join(pieces) == "Hi 😀" and tail == ""


def test_ids_past_the_vocabulary_are_ignored(byte_tokenizer):
    """A model's embedding may have more rows than the tokenizer has tokens."""
    ids = byte_tokenizer.encode("Hi 😀 there")
    unknown = len(byte_tokenizer) + 7
    output_ids = [unknown, *ids[:4], unknown, unknown, *ids[4:], unknown]
    assert byte_tokenizer.decode(output_ids) == "Hi 😀 there"
    pieces, tail = stream(byte_tokenizer, [unknown, *ids, unknown], output_ids)
    assert "".join(pieces) == "Hi 😀 there" and tail == ""


def test_spaces_between_special_tokens_is_accepted(byte_tokenizer):
    ids = [*byte_tokenizer.encode("a"), IM_END_ID, *byte_tokenizer.encode(" b")]
    for spaces in (True, False):
        detok = IncrementalDetokenizer(byte_tokenizer, [], skip_special_tokens=False,
                                       spaces_between_special_tokens=spaces)
        detok.add_tokens(ids)
        assert detok.text == "a<|im_end|> b"


def test_cost_per_token_is_bounded(byte_tokenizer):
    """Every decode covers a few ids, however long the output grows."""
    lengths = []

    class CountingTokenizer:
        def __getattr__(self, name):
            return getattr(byte_tokenizer, name)

        def __len__(self):
            return len(byte_tokenizer)

        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return byte_tokenizer.decode(ids, **kwargs)

    ids = byte_tokenizer.encode(" ".join(TEXTS) * 8)
    assert len(ids) > 1000
    detok = IncrementalDetokenizer(CountingTokenizer(), ids[:50])
    for token_id in ids:
        detok.add_tokens([token_id])
    detok.add_tokens(ids)  # one large group too
    assert detok.text == byte_tokenizer.decode(ids + ids)
    assert max(lengths) <= 8
    assert len(lengths) <= 3 * 2 * len(ids)


# ---- IncrementalDetokenizer, SentencePiece-style BPE ------------------------------------


def test_sentencepiece_factory_uses_byte_fallback_and_leading_spaces(sp_tokenizer):
    tokens = sp_tokenizer.convert_ids_to_tokens(sp_tokenizer.encode("".join(TEXTS)))
    assert any(t.startswith("<0x") for t in tokens)
    assert any(t.startswith("▁") and len(t) > 1 for t in tokens)


def test_sentencepiece_continuation_keeps_leading_space(sp_tokenizer):
    """Output tokens decoded alone lose the space of their first word; in context they
    keep it, as the prompt's text + the streamed text must equal the whole text."""
    prompt_text = "The capital of France is"
    prompt_ids = sp_tokenizer.encode(prompt_text)
    all_ids = sp_tokenizer.encode(prompt_text + " Paris, 你好 🤖 and more.")
    assert all_ids[:len(prompt_ids)] == prompt_ids
    output_ids = all_ids[len(prompt_ids):]
    pieces, tail = stream(sp_tokenizer, prompt_ids, output_ids)
    assert "".join(pieces) + tail == " Paris, 你好 🤖 and more."
    # Decoding the output on its own, as a naive detokenizer would, loses the space.
    assert sp_tokenizer.decode(output_ids) == "Paris, 你好 🤖 and more."


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_sentencepiece_pieces_concatenate_to_decode(sp_tokenizer, skip_special_tokens):
    rng = random.Random(3)
    texts = [*TEXTS, *corpus()[:20]]
    for _ in range(40):
        prompt_text, output_text = rng.choice(texts), rng.choice(texts)
        prompt_ids = sp_tokenizer.encode(prompt_text)[:rng.randint(0, 12)]
        # Special tokens go before words only: one inside a character's byte tokens breaks
        # it, and ByteFallback then turns the whole run of byte tokens into U+FFFD, so
        # decode() and the stream (which emitted the characters completed earlier) differ.
        output_ids = sp_tokenizer.encode(output_text)
        tokens = sp_tokenizer.convert_ids_to_tokens(output_ids)
        output_ids = with_specials(rng, output_ids, lambda i: i == len(tokens)
                                   or tokens[i].startswith("▁"))
        skip = {"skip_special_tokens": skip_special_tokens}
        whole = sp_tokenizer.decode(prompt_ids + output_ids, **skip)
        prompt = sp_tokenizer.decode(prompt_ids, **skip)
        assert whole.startswith(prompt)
        for groups in (None, random_groups(rng)):
            pieces, tail = stream(sp_tokenizer, prompt_ids, output_ids, group_sizes=groups,
                                  skip_special_tokens=skip_special_tokens)
            assert all(FFFD not in piece for piece in pieces)
            assert "".join(pieces) + tail == whole[len(prompt):]
        if not prompt_ids:
            assert "".join(pieces) == sp_tokenizer.decode(output_ids, **skip)


def test_sentencepiece_special_tokens_between_words(sp_tokenizer):
    ids = sp_tokenizer.encode("Hello world again")
    output_ids = [ids[0], EOS_ID, *ids[1:], IM_END_ID]
    expected = sp_tokenizer.decode(output_ids, skip_special_tokens=True)
    assert expected == "Hello world again"
    for n in (1, 2, 3, 100):
        pieces, tail = stream(sp_tokenizer, [], output_ids, group_sizes=iter(lambda: n, None))
        assert "".join(pieces) + tail == expected


# ---- StopStringMatcher ------------------------------------------------------------------


def feed_all(matcher, pieces):
    """Feeds pieces until a match; returns (emitted text per feed, stop string or None)."""
    emitted = []
    for piece in pieces:
        text, stop = matcher.feed(piece)
        emitted.append(text)
        if stop is not None:
            return emitted, stop
    return emitted, None


def test_no_stop_strings_pass_text_through():
    matcher = StopStringMatcher(())
    assert matcher.feed("hello") == ("hello", None)
    assert matcher.feed("") == ("", None)
    assert matcher.feed(" world") == (" world", None)
    assert matcher.flush() == ""


def test_match_inside_one_piece():
    assert StopStringMatcher(("END",)).feed("hello END world") == ("hello ", "END")
    assert StopStringMatcher(("END",), True).feed("hello END world") == ("hello END", "END")


@pytest.mark.parametrize("pieces", [["hello E", "ND world"], ["hello E", "N", "D"],
                                    ["hello ", "EN", "D!"]])
def test_match_split_across_pieces(pieces):
    emitted, stop = feed_all(StopStringMatcher(("END",)), pieces)
    assert stop == "END"
    assert "".join(emitted) == "hello "
    assert emitted[-1] == ""  # "E" / "EN" were held back, never shown
    emitted, stop = feed_all(StopStringMatcher(("END",), include_stop_str_in_output=True), pieces)
    assert (stop, "".join(emitted)) == ("END", "hello END")


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    matcher = StopStringMatcher(("END",))
    assert matcher.feed("hello E") == ("hello ", None)
    assert matcher.feed("N") == ("", None)
    assert matcher.feed("d") == ("ENd", None)


def test_overlapping_candidate_prefixes():
    assert StopStringMatcher(("abc",)).feed("ababc") == ("ab", "abc")
    emitted, stop = feed_all(StopStringMatcher(("abc",)), "ababc")
    assert emitted == ["", "", "ab", "", ""] and stop == "abc"
    emitted, stop = feed_all(StopStringMatcher(("aab",)), "aaab")
    assert emitted == ["", "", "a", ""] and stop == "aab"


def test_earliest_stop_wins():
    assert StopStringMatcher(("world", "lo")).feed("hello world") == ("hel", "lo")
    # "bc" is complete before "xbcd" is: the same answer whatever the chunking.
    assert StopStringMatcher(("xbcd", "bc")).feed("axbcd") == ("ax", "bc")
    assert feed_all(StopStringMatcher(("xbcd", "bc")), "axbcd") == (["a", "", "", "x"], "bc")
    # Both end at once: the longer one (starting first) wins.
    assert StopStringMatcher(("bc", "abc")).feed("xabc") == ("x", "abc")


def test_flush_releases_the_held_back_tail():
    matcher = StopStringMatcher(("STOP", "ZZ"))
    assert matcher.feed("aS") == ("a", None)
    assert matcher.feed("Z") == ("S", None)  # "SZ" starts no stop string; "Z" may start "ZZ"
    assert matcher.flush() == "Z"
    assert matcher.flush() == ""
    assert matcher.feed("x") == ("x", None)


def test_after_a_match_nothing_more_is_emitted():
    matcher = StopStringMatcher(("END",))
    assert matcher.feed("aEND tail E") == ("a", "END")
    assert matcher.feed("more") == ("", None)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError):
        StopStringMatcher(("ok", ""))


def reference_stop(text, stops):
    """Brute force: the stop string complete first (ties: the longest) and its start."""
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return end - len(stop), stop
    return None


def reference_held_back(text, stops):
    """Brute force: the longest suffix that is a proper prefix of a stop string."""
    for start in range(len(text)):
        if any(len(text) - start < len(s) and s.startswith(text[start:]) for s in stops):
            return text[start:]
    return ""


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_matcher_against_brute_force(include_stop):
    rng = random.Random(4)
    for _ in range(400):
        stops = tuple("".join(rng.choices("ab c", k=rng.randint(1, 4)))
                      for _ in range(rng.randint(1, 3)))
        text = "".join(rng.choices("ab c", k=rng.randint(0, 30)))
        matcher = StopStringMatcher(stops, include_stop)
        emitted, fed, stop = "", "", None
        i = 0
        while i < len(text) and stop is None:
            piece = text[i:i + rng.randint(0, 4)]
            i += len(piece)
            fed += piece
            out, stop = matcher.feed(piece)
            emitted += out
            if stop is None:  # hold back exactly the possible start of a stop string
                held = "" if include_stop else reference_held_back(fed, stops)
                assert emitted + held == fed
        match = reference_stop(text, stops)
        if match is None:
            assert stop is None
            assert emitted + matcher.flush() == text
        else:
            start, expected_stop = match
            assert stop == expected_stop
            assert emitted == text[:start + len(stop) if include_stop else start]


# ---- tokenizer factory ------------------------------------------------------------------


@pytest.mark.parametrize("build, low", [(build_tokenizer, MIN_VOCAB_SIZE),
                                        (build_sentencepiece_tokenizer,
                                         MIN_SENTENCEPIECE_VOCAB_SIZE)])
def test_factory_vocab_size_special_tokens_and_determinism(tmp_path, build, low):
    for vocab_size in (low, 512, MAX_VOCAB_SIZE):
        tokenizer = build(tmp_path / str(vocab_size), vocab_size)
        assert len(tokenizer) == vocab_size
    with pytest.raises(ValueError):
        build(tmp_path / "too_small", low - 1)
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKEN_IDS)) == [0, 1, 2, 3, 4, 5]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id,
            tokenizer.pad_token_id) == (0, 1, 2, 3)
    assert tokenizer.encode("hi")[0] != tokenizer.bos_token_id  # nothing is added
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    build(tmp_path / "again", MAX_VOCAB_SIZE)
    assert _files(tmp_path / str(MAX_VOCAB_SIZE)) == _files(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
