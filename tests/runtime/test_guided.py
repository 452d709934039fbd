"""Grammar masks in the sampler (greedy and random rows), the compile cache, and the wire."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import molink
from molink.runtime.guided import GuidedDecoding, check_structured, unpack_bitmask
from molink.runtime.sampler import Sampler, SamplingRequestState
from molink.sampling_params import SamplingParams, StructuredOutputsParams
from molink.transport.codec import decode_sampling, encode_sampling

MODEL_DIR = str(Path(molink.__file__).parent / "assets" / "default_model")
VOCAB = 4096
EOS = frozenset({1})


def _decode(guided: GuidedDecoding, params: SamplingParams, steps: int) -> list[int]:
    """Samples ``steps`` tokens from random logits under the request's grammar."""
    matcher = guided.matcher(params.structured_outputs, EOS)
    sampler, output = Sampler(seed=0), []
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        matcher.advance(output)
        state = SamplingRequestState(params, [5], list(output), EOS, guided=matcher)
        token = sampler(torch.randn(1, VOCAB, generator=generator), [state]).token_ids[0]
        if token in EOS:
            return output
        output.append(token)
    raise AssertionError("the grammar did not end")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampled_tokens_follow_the_grammar(temperature):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    guided = GuidedDecoding(MODEL_DIR, VOCAB)
    choice = SamplingParams(temperature=temperature, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no", "maybe so"]))
    regex = SamplingParams(temperature=temperature, structured_outputs=StructuredOutputsParams(
        regex="[0-9]{2}-[xy]"))
    assert tokenizer.decode(_decode(guided, choice, 20)) in ("yes", "no", "maybe so")
    text = tokenizer.decode(_decode(guided, regex, 20))
    assert len(text) == 4 and text[:2].isdigit() and text[2] == "-" and text[3] in "xy"
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"],
              "additionalProperties": False}
    params = SamplingParams(temperature=temperature,
                            structured_outputs=StructuredOutputsParams(json=schema))
    assert json.loads(tokenizer.decode(_decode(guided, params, 30)))["a"] in (1, 2)
    compiled = guided.num_compiled
    guided.matcher(StructuredOutputsParams(json=dict(reversed(schema.items()))), EOS)
    assert guided.num_compiled == compiled  # the same schema: compiled once


def test_unguided_rows_are_untouched_and_unpacking_is_exact():
    bitmask = torch.tensor([[0b101, -1]], dtype=torch.int32)
    allowed = unpack_bitmask(bitmask, 40)
    assert allowed[0, :3].tolist() == [True, False, True] and not allowed[0, 3:32].any()
    assert allowed[0, 32:].all()
    logits = torch.randn(2, 8)
    assert Sampler(seed=0)(logits, [SamplingRequestState(SamplingParams(temperature=0), [1], [],
                                                         EOS)] * 2).token_ids == \
        logits.argmax(-1).tolist()


def test_bad_specs_name_the_field_and_the_wire_keeps_the_spec():
    with pytest.raises(ValueError, match="guided_regex"):
        check_structured(StructuredOutputsParams(regex="a(b"), "guided_regex")
    with pytest.raises(ValueError, match="response_format"):
        check_structured(StructuredOutputsParams(json={"type": "nope"}), "response_format")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    for so in (StructuredOutputsParams(json={"type": "object"}),
               StructuredOutputsParams(choice=["a", "b"]), StructuredOutputsParams(regex="x+"),
               StructuredOutputsParams(json_object=True)):
        decoded = decode_sampling(encode_sampling(SamplingParams(structured_outputs=so)))
        assert (decoded.structured_outputs.kind, decoded.structured_outputs.spec) == (so.kind,
                                                                                      so.spec)
