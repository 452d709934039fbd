"""The OpenAI request bodies this server accepts, as pydantic models (the API's schema).

They check types only, strictly (``"2"`` is not an integer, ``true`` is not a number), so a
wrong type is a 400 naming the field. Value ranges are checked where they are defined:
``SamplingParams`` for the sampling fields, ``coordinator.prompts`` for prompts. Unknown
fields are ignored, as real clients send extras (vLLM's ``extra_body`` fields, ``user``,
``metadata``, ...); OpenAI fields this server cannot honour are accepted only at their "off"
value and are a 400 otherwise. Every field may be ``null``, meaning "not given".

Chat messages are taken as clients send them (``content`` a string, a list of parts, or
``null`` on an assistant turn with ``tool_calls``; ``tool`` messages with ``tool_call_id``);
``chat_messages`` turns them into what chat templates expect.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from molink.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N

INT_LIMIT = 2**31 - 1
MAX_LIST_ITEMS = 1024  # stop / stop_token_ids (SamplingParams checks the items)


def _encodable(text: str) -> str:
    """JSON allows lone surrogates; tokenizers choke on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
TokenIds = Annotated[list[int], Field(min_length=1)]
Count = Annotated[int, Field(ge=1, le=INT_LIMIT)]
NumTop = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _logit_bias(value: dict[str, float] | None) -> dict[int, float] | None:
    """JSON keys are strings: ``{"50256": -100}`` -> ``{50256: -100.0}`` (SamplingParams
    checks the values, ``validate_prompt`` the ids against the vocabulary)."""
    if value is None:
        return None
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
    ids = {}
    for key, bias in value.items():
        if not key.isdigit() or not key.isascii() or len(key) > 10:
            raise ValueError(f"logit_bias keys must be token ids (integers as strings), got {key!r}")
        ids[int(key)] = bias
    return ids


class StreamOptions(_Strict):
    include_usage: bool | None = None


class JsonSchemaFormat(_Strict):
    name: Text | None = None
    description: Text | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}``."""

    type: Text
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` body field (one constraint)."""

    json_: dict[str, Any] | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    json_object: bool | None = None


class SamplingFields(_Strict):
    """What both endpoints share: the model, n, streaming and the sampling fields."""

    # Fields handed to SamplingParams as they are (it checks their ranges).
    SAMPLING: ClassVar[tuple[str, ...]] = (
        "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
        "frequency_penalty", "repetition_penalty", "min_tokens", "stop", "stop_token_ids",
        "ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
        "spaces_between_special_tokens", "logit_bias", "prompt_logprobs")
    # Fields this server does not implement -> the values that mean "off".
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    max_tokens: Count | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_LIST_ITEMS)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_LIST_ITEMS)] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    logit_bias: Annotated[dict[str, float] | None, AfterValidator(_logit_bias)] = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None  # n <= best_of
    prompt_logprobs: NumTop | None = None  # vLLM's: top logprobs per prompt token
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprobs say "token_id:N"
    # Structured output (``structured.py``): OpenAI's field, and vLLM's extra ones.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Annotated[list[Text], Field(max_length=MAX_LIST_ITEMS)] | None = None
    structured_outputs: StructuredOutputs | None = None

    def sampling_values(self) -> dict[str, Any]:
        """The sampling fields that were given, for ``SamplingParams(**values)``."""
        return {name: getattr(self, name) for name in self.SAMPLING
                if getattr(self, name) is not None}


def _off_only(cls, value, info):
    if value not in cls.UNSUPPORTED[info.field_name]:
        raise ValueError(f"{info.field_name} is not supported by this server")
    return value


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` (and ``/generate``)."""

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"suffix": (None, "")}

    # A string, a token-id list, or a non-empty list of either.
    prompt: Text | TokenIds | Annotated[list[Text | TokenIds], Field(min_length=1)]
    logprobs: NumTop | None = None  # how many top logprobs per token
    echo: bool | None = None  # the prompt's text (and with logprobs, its tokens') first
    suffix: Any = None

    _unsupported = field_validator("suffix")(classmethod(_off_only))


class ContentPart(_Strict):
    """One part of a message's content: ``{"type": "text", "text": ...}``; the other types
    (``image_url``, ``input_audio``, ...) are read only to be refused by name."""

    type: Text
    text: Text | None = None


class ToolCallFunction(_Strict):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: Text | None = None
    type: Text | None = None  # "function"
    function: ToolCallFunction


class FunctionDefinition(_Strict):
    name: Text = Field(min_length=1)
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Text  # "function"
    function: FunctionDefinition


class ToolChoiceFunction(_Strict):
    name: Text


class NamedToolChoice(_Strict):
    type: Text  # "function"
    function: ToolChoiceFunction


class ChatMessage(_Strict):
    role: Text = Field(min_length=1)
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_LIST_ITEMS)] | None = None
    name: Text | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_LIST_ITEMS)] | None = None
    tool_call_id: Text | None = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        "functions": (None, []), "audio": (None,), "prediction": (None,),
        "chat_template": (None,)}

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool | None = None  # default true
    continue_final_message: bool | None = None  # default false
    chat_template_kwargs: dict[str, Any] | None = None  # further template variables
    chat_template: Any = None  # a per-request template: refused, as vLLM does by default
    max_completion_tokens: Count | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: NumTop | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_LIST_ITEMS)] | None = None
    tool_choice: Text | NamedToolChoice | None = None  # "none", "auto", "required" or named
    parallel_tool_calls: bool | None = None  # default true
    functions: Any = None
    audio: Any = None
    prediction: Any = None

    _unsupported = field_validator("functions", "audio", "prediction",
                                   "chat_template")(classmethod(_off_only))


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM's): a ``prompt``, or chat ``messages`` rendered as
    ``/v1/chat/completions`` would render them."""

    model: str | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (vLLM's)."""

    model: str | None = None
    tokens: Annotated[list[int], Field(max_length=1 << 20)]
