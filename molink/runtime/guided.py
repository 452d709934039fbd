"""Guided decoding: a request's output held to a grammar while the last stage samples it.

A request with ``SamplingParams.structured_outputs`` (a JSON schema, a regex, a choice of
strings, any JSON object) gets a matcher on the last stage (``xgrammar``). Each step,
before sampling::

    matcher.advance(output tokens so far)   tokens the head appended since the last step
    matcher.fill(bitmask row)               which tokens the grammar allows next
    logits[row, disallowed] = -inf          greedy and random rows alike

Once the grammar is complete only the end-of-sequence ids are allowed, so the request stops
with finish_reason "stop". The matcher lives in the executor's per-request state: when the
request is freed, aborted or the stage resets, it goes with it. A recomputed (preempted)
request gets a new matcher that replays its output tokens. Each distinct grammar is
compiled once per tokenizer (``GuidedDecoding``'s cache, keyed by kind and spec).

The head checks a spec with the same library (``check_structured``) before queueing it, so
a bad schema or regex is a 400 there, never an error here.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict

import torch

from molink.model.tokenizer_files import load_tokenizer
from molink.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

MAX_COMPILED_GRAMMARS = 64  # per stage; least recently used ones are dropped
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[06:17:24] /project/cpp/x.cc:94: "


def _xgrammar():
    """The grammar library, imported on first use (a ValueError naming it if missing)."""
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured output needs package xgrammar (pip install xgrammar), "
                         "which is not installed on this server") from None
    return xgrammar


def _grammar(xgr, kind: str, spec: str):
    """The library's Grammar of a (kind, spec) pair, not yet bound to a tokenizer."""
    if kind == "json":
        return xgr.Grammar.from_json_schema(spec, any_whitespace=False)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    assert kind == "choice", kind
    return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in json.loads(spec)))


def check_structured(params: StructuredOutputsParams, field: str) -> None:
    """Raises ValueError naming ``field`` when the grammar library rejects the spec."""
    xgr = _xgrammar()
    if params.kind == "json":
        try:
            schema = json.loads(params.spec)
        except ValueError:
            raise ValueError(f"{field} is not valid JSON") from None
        if not isinstance(schema, dict):
            raise ValueError(f"{field} must be a JSON schema (an object), got "
                             f"{type(schema).__name__}")
    try:
        _grammar(xgr, params.kind, params.spec)
    except (RuntimeError, ValueError) as exc:
        reason = _CPP_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        raise ValueError(f"{field} is not usable for structured output: {reason}") from None


class GuidedMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher, num_words: int) -> None:
        self._matcher = matcher
        self.num_words = num_words  # int32 words of one bitmask row
        self.num_consumed = 0  # output tokens fed to the matcher
        self.failed = False  # a token the grammar refused: guidance stops, sampling goes on

    def advance(self, output_token_ids: list[int]) -> None:
        """Feeds the output tokens not yet fed (the head appends one per step)."""
        for token in output_token_ids[self.num_consumed:]:
            if self.failed or self._matcher.is_terminated():
                break
            if not self._matcher.accept_token(token):
                logger.warning("token %d is outside the request's grammar; it is no longer "
                               "guided", token)
                self.failed = True
        self.num_consumed = len(output_token_ids)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into ``bitmask[row]`` (left all-allowed when the
        grammar has ended or failed: only ``ignore_eos`` goes on after its end)."""
        if not self.failed and not self._matcher.is_terminated():
            self._matcher.fill_next_token_bitmask(bitmask, row)


class GuidedDecoding:
    """The last stage's grammar compiler: tokenizer loaded, and grammars compiled, on first use."""

    def __init__(self, tokenizer_path: str, vocab_size: int) -> None:
        """``vocab_size``: the width of this model's logits."""
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self._compilers: dict[frozenset[int], object] = {}  # per set of EOS ids
        self._compiled: OrderedDict[tuple, object] = OrderedDict()
        self.num_compiled = 0  # grammars compiled so far (the cache's misses)

    def matcher(self, params: StructuredOutputsParams, eos_token_ids: frozenset[int]) -> GuidedMatcher:
        xgr = _xgrammar()
        key = (params.kind, params.spec, eos_token_ids)
        compiled = self._compiled.get(key)
        if compiled is None:
            grammar = _grammar(xgr, params.kind, params.spec)
            compiled = self._compiler(xgr, eos_token_ids).compile_grammar(grammar)
            self.num_compiled += 1
            self._compiled[key] = compiled
            if len(self._compiled) > MAX_COMPILED_GRAMMARS:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return GuidedMatcher(xgr.GrammarMatcher(compiled), -(-self.vocab_size // 32))

    def _compiler(self, xgr, eos_token_ids: frozenset[int]):
        compiler = self._compilers.get(eos_token_ids)
        if compiler is None:
            tokenizer = load_tokenizer(self.tokenizer_path)
            vocab_size = max(self.vocab_size, len(tokenizer))
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=sorted(eos_token_ids) or None)
            compiler = self._compilers[eos_token_ids] = xgr.GrammarCompiler(info,
                                                                            max_threads=1)
            logger.info("structured output: tokenizer of %s loaded (%d tokens)",
                        self.tokenizer_path, vocab_size)
        return compiler


def apply_guided_masks(logits: torch.Tensor, matchers: list[GuidedMatcher | None]) -> torch.Tensor:
    """logits: [num_rows, vocab_size], one matcher (or None) per row. Returns `logits` itself
    when no row is guided, else a float32 copy with each guided row's disallowed tokens at
    -inf (tokens beyond the grammar's vocabulary are disallowed too)."""
    rows = [i for i, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return logits
    num_words = matchers[rows[0]].num_words
    bitmask = torch.full((len(rows), num_words), -1, dtype=torch.int32)  # [guided rows, words]
    for j, i in enumerate(rows):
        matchers[i].fill(bitmask, j)
    allowed = unpack_bitmask(bitmask.to(logits.device), logits.shape[1])  # [guided, vocab]
    masked = logits.float().clone()
    index = torch.tensor(rows, device=logits.device)
    masked[index] = masked[index].masked_fill(~allowed, -math.inf)
    return masked


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32, bit b of word w = token 32 * w + b -> [rows, vocab_size] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask[:, :, None] >> shifts) & 1).reshape(bitmask.shape[0], -1)  # [rows, 32 * words]
    if bits.shape[1] < vocab_size:
        bits = torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]))
    return bits[:, :vocab_size].bool()
