"""Structured output of one request: its body's constraint as ``StructuredOutputsParams``.

Read from OpenAI's ``response_format`` (``json_object``; ``json_schema`` with its
``schema``) or vLLM's extra fields (``guided_json``, ``guided_regex``, ``guided_choice``,
``structured_outputs``), at most one of them. The spec is compiled by the grammar library
the last stage uses (``runtime.guided.check_structured``) here, at the head, so a bad
schema or regex is a 400 naming its field before the request is queued.
"""

from __future__ import annotations

from molink.coordinator.prompts import RequestError
from molink.entrypoints.protocol import SamplingFields
from molink.runtime.guided import check_structured
from molink.sampling_params import StructuredOutputsParams


def structured_outputs(request: SamplingFields) -> StructuredOutputsParams | None:
    """The request's constraint, checked; None when it has none; RequestError otherwise."""
    given = _given(request)
    if not given:
        return None
    if len(given) > 1:
        raise RequestError("only one structured output constraint may be given, got "
                           + ", ".join(field for field, _ in given), given[1][0])
    field, values = given[0]
    return checked(values, field)


def checked(values: dict, field: str) -> StructuredOutputsParams:
    """``StructuredOutputsParams(**values)``, compiled once here; RequestError naming ``field``."""
    try:
        params = StructuredOutputsParams(**values)
        check_structured(params, field)
    except ValueError as exc:
        message = str(exc)
        raise RequestError(message if message.startswith(field) else f"{field}: {message}",
                           field) from None
    return params


def _given(request: SamplingFields) -> list[tuple[str, dict]]:
    """(field, StructuredOutputsParams values) of every constraint the body gives."""
    given = []
    response_format = _response_format(request)
    if response_format is not None:
        given.append(response_format)
    for field, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                        ("guided_choice", "choice")):
        if getattr(request, field) is not None:
            given.append((field, {kind: getattr(request, field)}))
    so = request.structured_outputs
    if so is not None:
        values = {"json": so.json_, "regex": so.regex, "choice": so.choice,
                  "json_object": so.json_object}
        given.append(("structured_outputs",
                      {key: value for key, value in values.items() if value is not None}))
    return given


def _response_format(request: SamplingFields) -> tuple[str, dict] | None:
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return "response_format", {"json_object": True}
    if fmt.type != "json_schema":
        raise RequestError(f"response_format.type must be 'text', 'json_object' or "
                           f"'json_schema', got {fmt.type!r}", "response_format")
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise RequestError("response_format.json_schema.schema is required for type "
                           "'json_schema'", "response_format")
    return "response_format", {"json": fmt.json_schema.json_schema}
