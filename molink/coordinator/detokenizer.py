"""Streamed output text: generated token ids become text pieces, cut at stop strings.

Two small state machines, one per request, used one after the other by the engine::

    token ids --IncrementalDetokenizer--> text pieces --StopStringMatcher--> text to emit

``IncrementalDetokenizer`` never emits a broken UTF-8 character; ``StopStringMatcher``
never emits part of a stop string. Both cost O(1) per token (O(length of the stop strings)
per piece for the matcher), whatever the length of the output so far.
"""

from __future__ import annotations

import itertools

# What decoding an incomplete UTF-8 sequence yields; output ending in it may still change.
REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded before the first output token, so that a SentencePiece "▁word"
# token gets its leading space (decoders strip the space of the first word they decode).
NUM_PROMPT_CONTEXT_TOKENS = 8
# A UTF-8 character has at most 4 bytes, so it spans at most 4 tokens.
MAX_TOKENS_PER_CHAR = 4
# (ids dropped at the start, ids dropped at the end) of the prompt context, fewest first.
_CONTEXT_TRIMS = sorted(itertools.product(range(MAX_TOKENS_PER_CHAR), repeat=2), key=sum)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, never emitting broken UTF-8.

    The prefix-offset method of vLLM and TGI: the ids of the last emitted piece (the
    *window*) are decoded together with the ids not yet emitted (*pending*), and the text
    beyond the window's own text is new::

        ids:   ... | window  | pending     |
                   ^ 0       ^ read_offset ^ len(ids)
        piece = decode(window + pending)[len(decode(window)):]

    While that text ends in U+FFFD a multi-byte character is still incomplete, so nothing
    is emitted and the pending ids wait for the next token. Once a piece is emitted, its ids
    become the next window and older ids are dropped. The window starts where a previous
    piece ended cleanly, so it never starts inside a character.

    Tokens are processed one at a time, so the pieces are the same however the ids are
    grouped into ``add_tokens`` calls. Ids that ``decode`` would skip (special tokens with
    ``skip_special_tokens``, ids past the vocabulary) are dropped on arrival: they add no
    text, so they need no decode and take no room in the window or the prompt context.

    One known difference from ``tokenizer.decode``: a byte-fallback decoder (SentencePiece
    ``<0xNN>`` tokens) turns a whole run of byte tokens into U+FFFD when the run is not
    valid UTF-8, e.g. when a special token is sampled inside a character. Characters of
    that run completed before the break were already emitted as text.

    ``spaces_between_special_tokens`` is passed on to ``tokenizer.decode``; transformers
    5.x fast tokenizers ignore it.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], *,
                 skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._decode_kwargs = {"skip_special_tokens": skip_special_tokens,
                               "spaces_between_special_tokens": spaces_between_special_tokens}
        self._skipped_ids = _skipped_token_ids(tokenizer) if skip_special_tokens else frozenset()
        # Ids past the vocabulary (a model's padded embedding rows) decode to nothing.
        self._num_known_ids = _num_known_ids(tokenizer)
        self._ids = self._prompt_context(prompt_token_ids)  # window + pending
        self._read_offset = len(self._ids)
        self._window_text = self._decode(self._ids)
        self._text = ""

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append generated ids; returns the new text they complete (may be "")."""
        piece = "".join([self._add_token(token_id) for token_id in token_ids
                         if token_id < self._num_known_ids and token_id not in self._skipped_ids])
        self._text += piece
        return piece

    def flush(self) -> str:
        """The text of ids still pending, U+FFFD included; call once, when the request ends.

        Pending ids remain only when the output ends inside a character (or in invalid
        bytes); without this their replacement characters would be lost, and ``text`` would
        differ from ``tokenizer.decode(output_ids)``.
        """
        if self._read_offset == len(self._ids):
            return ""
        piece = self._decode(self._ids)[len(self._window_text):]
        self._start_window()
        self._text += piece
        return piece

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return self._text

    # ---- helpers ------------------------------------------------------------------------

    def _add_token(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) <= len(self._window_text) or text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character is still incomplete
        piece = text[len(self._window_text):]
        self._start_window()
        return piece

    def _start_window(self) -> None:
        """Make the pending ids (just emitted) the new window."""
        del self._ids[:self._read_offset]
        self._read_offset = len(self._ids)
        self._window_text = self._decode(self._ids)

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The last few decodable prompt ids, cut to whole characters at both ends.

        The last ``NUM_PROMPT_CONTEXT_TOKENS`` ids may start inside a character, and the
        prompt may end inside one; those bytes decode to U+FFFD and, with a byte-fallback
        decoder, turn the characters next to them into U+FFFD too. So drop up to
        ``MAX_TOKENS_PER_CHAR - 1`` ids at either end, fewest first, until both ends decode
        cleanly (one decode in the usual case).
        """
        ids = self._last_decodable_ids(prompt_token_ids)
        for num_dropped_at_start, num_dropped_at_end in _CONTEXT_TRIMS:
            window = ids[num_dropped_at_start:len(ids) - num_dropped_at_end]
            text = self._decode(window)
            if window and not (text.startswith(REPLACEMENT_CHAR)
                               or text.endswith(REPLACEMENT_CHAR)):
                return window
        return []  # no clean window nearby (invalid bytes): decode the output on its own

    def _last_decodable_ids(self, token_ids: list[int]) -> list[int]:
        ids: list[int] = []
        for token_id in reversed(token_ids):
            if len(ids) == NUM_PROMPT_CONTEXT_TOKENS:
                break
            if token_id < self._num_known_ids and token_id not in self._skipped_ids:
                ids.append(token_id)
        return ids[::-1]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, **self._decode_kwargs) if token_ids else ""


def _skipped_token_ids(tokenizer) -> frozenset[int]:
    """The ids ``tokenizer.decode(..., skip_special_tokens=True)`` leaves out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust decoder skips exactly the added tokens marked special
        return frozenset(token_id for token_id, token in backend.get_added_tokens_decoder().items()
                         if token.special)
    return frozenset(tokenizer.all_special_ids)


def _num_known_ids(tokenizer) -> int:
    """One past the largest id the tokenizer knows (added tokens may lie beyond ``len``)."""
    return max(len(tokenizer), 1 + max(tokenizer.added_tokens_decoder, default=-1))


class StopStringMatcher:
    """Finds stop strings in streamed text, also when a stop string is split across tokens.

    Text that could be the start of a stop string is held back until the next piece shows
    whether it is one, so a streaming client never sees part of a stop string::

        stop "END", pieces "abc E", "N", "D tail"  ->  emit "abc ", "", "" and match "END"
        stop "END", pieces "abc E", "x"            ->  emit "abc ", "Ex"

    When several stop strings occur, the one that is complete first (the earliest end, then
    the longest) wins, so the result does not depend on how the text is cut into pieces.
    Text after a stop string is dropped. With ``include_stop_str_in_output`` the stop string
    is emitted too, and nothing is held back (as in vLLM; a client sees a prefix of the stop
    string either way), but the tail that could start one is still kept for matching.
    After a match the matcher is finished: ``feed`` returns ``("", None)``.
    """

    def __init__(self, stop_strings: tuple[str, ...],
                 include_stop_str_in_output: bool = False) -> None:
        if any(not stop for stop in stop_strings):
            raise ValueError("stop must not contain empty strings")
        self._stop_strings = tuple(stop_strings)
        self._include_stop = include_stop_str_in_output
        # The tail that could start a stop string; its first _num_emitted characters were
        # already emitted (only with include_stop_str_in_output), the rest are held back.
        self._tail = ""
        self._num_emitted = 0
        self._finished = False

    def feed(self, new_text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit now, matched stop string or None)."""
        if self._finished:
            return "", None
        if not self._stop_strings:
            return new_text, None
        text = self._tail + new_text
        match = self._find_first_stop(text)
        if match is not None:
            start, stop = match
            self._finished = True
            self._tail, emitted_from, self._num_emitted = "", self._num_emitted, 0
            return text[emitted_from:start + len(stop) if self._include_stop else start], stop
        tail_start = self._tail_start(text)
        emit_to = len(text) if self._include_stop else tail_start
        emitted = text[self._num_emitted:emit_to]
        self._tail, self._num_emitted = text[tail_start:], emit_to - tail_start
        return emitted, None

    def flush(self) -> str:
        """The held-back tail, to emit when the request finishes for another reason."""
        held_back = self._tail[self._num_emitted:]
        self._tail, self._num_emitted = "", 0
        return held_back

    def _find_first_stop(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the occurrence that ends first, ties to the longest."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stop_strings:
            start = text.find(stop)
            if start != -1 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _tail_start(self, text: str) -> int:
        """Start of the longest suffix of ``text`` that is a proper prefix of a stop string.

        ``text`` holds no whole stop string, so only the last ``len(stop) - 1`` characters
        can start one.
        """
        cut = len(text)
        for stop in self._stop_strings:
            start = text.find(stop[0], max(0, len(text) - len(stop) + 1), cut)
            while start != -1:
                if stop.startswith(text[start:]):
                    cut = start
                    break
                start = text.find(stop[0], start + 1, cut)
        return cut
