"""logit_bias from the request to the sampler: checked once (SamplingParams; the vocabulary
where the head knows it), carried on the wire to the last stage, added to the logits there
before penalties and sampling, and never to the logprobs (vLLM's raw logprobs)."""

from __future__ import annotations

import math

import pytest
import torch

from molink.coordinator.prompts import RequestError, validate_prompt
from molink.runtime.sampler import Sampler, SamplingRequestState
from molink.sampling_params import MAX_LOGIT_BIAS, SamplingParams
from molink.transport import molink_pb2 as pb
from molink.transport.codec import WireFormatError, decode_sampling, encode_sampling

VOCAB = 8


def _state(**params) -> SamplingRequestState:
    return SamplingRequestState(SamplingParams(**params), [1, 2], [], frozenset({0}))


def _logits(num_rows: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(num_rows, VOCAB)  # [num_rows, vocab_size]


def test_bias_moves_the_argmax_of_its_row_only():
    logits = _logits(3)
    worst = int(logits[0].argmin())
    best = int(logits[1].argmax())
    states = [_state(temperature=0, logit_bias={worst: 100}),
              _state(temperature=0, logit_bias={best: -100}), _state(temperature=0)]
    out = Sampler(seed=0)(logits, states)
    assert out.token_ids[0] == worst
    assert out.token_ids[1] not in (best,) and out.token_ids[1] == int(
        logits[1].clone().index_fill_(0, torch.tensor([best]), -math.inf).argmax())
    assert out.token_ids[2] == int(logits[2].argmax())


def test_bias_forces_draws_and_leaves_logprobs_raw():
    logits = _logits(1)
    token = int(logits[0].argmin())
    sampler = Sampler(seed=1)
    for step in range(20):
        state = _state(temperature=1.0, seed=step, logprobs=1, logit_bias={token: 100})
        out = sampler(logits, [state])
        assert out.token_ids == [token]
        raw = float(logits[0].log_softmax(-1)[token])
        assert out.logprobs[0].logprob == pytest.approx(raw, abs=1e-5)


def test_params_check_the_bias():
    assert SamplingParams(logit_bias={3: 1, 1: -2.5}).logit_bias == {1: -2.5, 3: 1.0}
    assert SamplingParams(logit_bias={}).logit_bias is None
    for bad, says in [({1: 100.5}, "logit_bias must be in"), ({1: math.nan}, "finite"),
                      ({-1: 1}, "token ids"), ({"1": 1}, "token ids"), ({True: 1}, "token ids"),
                      ([1], "map token ids"),
                      ({i: 1 for i in range(MAX_LOGIT_BIAS + 1)}, "at most")]:
        with pytest.raises(ValueError, match=says):
            SamplingParams(logit_bias=bad)
    with pytest.raises(RequestError, match=r"logit_bias token ids must be in \[0, 8\)") as caught:
        validate_prompt([1, 2], SamplingParams(logit_bias={8: 1}), VOCAB, 64)
    assert caught.value.param == "logit_bias"


def test_the_bias_crosses_the_wire():
    params = SamplingParams(temperature=0.5, logit_bias={7: -100, 2: 12.5})
    decoded = decode_sampling(pb.SamplingParams.FromString(
        encode_sampling(params).SerializeToString()))
    assert decoded.logit_bias == {2: 12.5, 7: -100.0}
    assert decode_sampling(encode_sampling(SamplingParams())).logit_bias is None
    uneven = encode_sampling(params)
    uneven.logit_bias_values.append(1.0)
    with pytest.raises(WireFormatError, match="logit_bias"):
        decode_sampling(uneven)
    too_big = encode_sampling(params)
    too_big.logit_bias_values[0] = 1e9
    with pytest.raises(WireFormatError, match="logit_bias"):
        decode_sampling(too_big)
