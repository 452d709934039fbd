"""SamplingParams: how one request's tokens are chosen and when it stops.

Mirrors vLLM's ``SamplingParams`` (same field names, same meaning) so code written for
vLLM runs unchanged. Torch-free: the scheduler reads the stop conditions, the sampler on
the last stage reads the rest. Every field is validated once, here, with a ``ValueError``
naming the offending field.
"""

from __future__ import annotations

import dataclasses
import json as _json
import math
from dataclasses import dataclass, field

# Values beyond these are certainly user error and would only waste memory or time.
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_N = 128
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_LOGIT_BIAS_VALUE = 100.0  # OpenAI's range: [-100, 100]
_SEED_MAX = 2**63 - 1
MAX_STRUCTURED_SPEC_CHARS = 1 << 20  # a schema, regex or choice list as text
STRUCTURED_KINDS = ("json", "regex", "choice", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What a request's output must match, enforced while decoding (the last stage masks
    the logits with a grammar): vLLM's ``StructuredOutputsParams``, one constraint given.

    ``json``: a JSON schema (a dict, or its JSON text); ``regex``: a regular expression;
    ``choice``: the output is exactly one of these strings; ``json_object``: any JSON object.
    Validated here for shape only; whether the schema or regex compiles is checked at the
    head by the grammar library (``runtime.guided.check_structured``), before queueing.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None
    # Normalised: (kind, spec text), the wire form and the compile cache's key.
    kind: str = field(default="", init=False)
    spec: str = field(default="", init=False)

    def __post_init__(self) -> None:
        given = [name for name in STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs must give exactly one of json, regex, choice "
                             f"or json_object, got {', '.join(given) or 'none'}")
        spec = _structured_spec(given[0], getattr(self, given[0]))
        if len(spec) > MAX_STRUCTURED_SPEC_CHARS:
            raise ValueError(f"{given[0]} may be at most {MAX_STRUCTURED_SPEC_CHARS} characters")
        object.__setattr__(self, "kind", given[0])
        object.__setattr__(self, "spec", spec)

    @classmethod
    def from_wire(cls, kind: str, spec: str) -> StructuredOutputsParams:
        if kind not in STRUCTURED_KINDS:
            raise ValueError(f"unknown structured output kind {kind!r}")
        value = {"json": spec, "regex": spec, "choice": None, "json_object": True}[kind]
        if kind == "choice":
            value = _json.loads(spec)
        return cls(**{kind: value})


def _structured_spec(kind: str, value) -> str:
    if kind == "json_object":
        return ""
    if kind == "choice":
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(c, str) and c for c in value)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return _json.dumps(list(value))
    if kind == "json" and isinstance(value, dict):
        return _json.dumps(value, sort_keys=True)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string" +
                         (" or a JSON schema object" if kind == "json" else ""))
    return value


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: until the model length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token
    # number of top logprobs per prompt token (vLLM's): each prompt token's logprob given
    # the tokens before it (the first has none), from the same raw distribution
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # token id -> a bias added to its logit before sampling (last stage); -100 bans it in
    # practice, +100 all but forces it. Token ids are checked against the vocabulary where
    # the vocabulary is known (``coordinator.prompts.validate_prompt``).
    logit_bias: dict[int, float] | None = None
    # Constrains the output to a schema, regex or choice (the last stage applies it).
    structured_outputs: StructuredOutputsParams | None = None
    # Normalised views, filled in __post_init__.
    stop_strings: tuple[str, ...] = field(default=(), init=False, repr=False)
    stop_token_id_set: frozenset[int] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        _check_int("n", self.n, low=1, high=MAX_N)
        _check_float("temperature", self.temperature, low=0.0, high=1e4)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, low=-1, high=2**31 - 1)
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=-_SEED_MAX, high=_SEED_MAX)
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, high=1e4, low_open=True)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1, high=2**31 - 1)
        _check_int("min_tokens", self.min_tokens, low=0, high=2**31 - 1)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                f"and max_tokens={self.max_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=0, high=MAX_LOGPROBS)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if not isinstance(self.structured_outputs, (StructuredOutputsParams, type(None))):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")  # noqa: TRY004
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))
        object.__setattr__(self, "stop_strings", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_id_set", _normalise_stop_ids(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        """Greedy decoding: temperature 0 (or top_k 1) makes sampling deterministic."""
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


_GREEDY_EPS = 1e-5


def _check_int(name: str, value, *, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_float(name: str, value, *, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ValueError(f"{name} must be finite, got {str(value)[:32]}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")


def _normalise_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(items) > MAX_STOP_STRINGS:
        raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(items)}")
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"stop must contain only strings, got {item!r}")
        if not item:
            raise ValueError("stop must not contain empty strings")
        if len(item) > MAX_STOP_STRING_CHARS:
            raise ValueError(f"each stop string may be at most {MAX_STOP_STRING_CHARS} characters")
    return tuple(items)


def _normalise_logit_bias(bias) -> dict[int, float] | None:
    """A copy (the caller's dict may change), None when empty."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(  # noqa: TRY004 - a ValueError, as for every bad input here
            f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
    for token, value in bias.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
        _check_float("logit_bias", value, low=-MAX_LOGIT_BIAS_VALUE, high=MAX_LOGIT_BIAS_VALUE)
    return {token: float(value) for token, value in sorted(bias.items())} or None


def _normalise_stop_ids(ids) -> frozenset[int]:
    if ids is None:
        return frozenset()
    if not isinstance(ids, (list, tuple, set, frozenset)):
        raise ValueError(f"stop_token_ids must be a list of integers, got {type(ids).__name__}")
    for item in ids:
        _check_int("stop_token_ids", item, low=0, high=2**31 - 1)
    return frozenset(ids)
