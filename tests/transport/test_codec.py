"""The wire codec round-trips every message and refuses malformed input (no torch here)."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from molink.messages import (BatchEntry, CachedRequest, LinkReport, NewRequest, RawTensor,
                             StepOutput, StepPlan, TokenLogprobs)
from molink.sampling_params import SamplingParams
from molink.transport import molink_pb2 as pb
from molink.transport.codec import (WireFormatError, decode_result, decode_step, decode_tensor,
                                    encode_result, encode_step)

ROOT = Path(__file__).resolve().parent.parent.parent


def _plan() -> StepPlan:
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=42, logprobs=3,
                            prompt_logprobs=0, repetition_penalty=1.1, stop_token_ids=[7, 9], min_tokens=2,
                            max_tokens=None)  # stop conditions stay on the head: not sent
    return StepPlan(
        step_id=12, microbatch_id=2,
        batch=[BatchEntry("a", 0, 5, True), BatchEntry("b", 9, 1, True)],
        new_requests=[NewRequest("a", [1, 2, 3, 4, 5], 5, params, [3, 4])],
        cached_requests=[CachedRequest("b", [17], [8])],
        freed_request_ids=["old"])


def test_step_round_trip():
    plan = _plan()
    hidden = RawTensor(data=bytes(range(48)), dtype="float32", shape=(6, 2))
    wire = pb.StepMessage.FromString(encode_step(plan, hidden, reset=True).SerializeToString())
    step = decode_step(wire)
    assert step.plan == plan
    assert step.hidden == hidden and step.reset and step.error == ""
    sent = step.plan.new_requests[0].sampling_params
    assert sent.temperature == 0.7 and sent.seed == 42 and sent.stop_token_id_set == {7, 9}
    assert sent.prompt_logprobs == 0 and plan.new_requests[0].sampling_params.logprobs == 3


def test_result_round_trip():
    output = StepOutput(step_id=3, microbatch_id=1, sampled_token_ids={"a": 5, "b": 0},
                        logprobs={"a": TokenLogprobs(5, -0.25, 1, [(5, -0.25), (8, -2.5)])},
                        prompt_logprobs={"c": {1: TokenLogprobs(4, -3.0, 7, [(2, -0.5)]),
                                               2: TokenLogprobs(9, -0.5, 1, [])}})
    hops = (LinkReport(1e8, 0.02, 1000, 3, 40, "int8"), LinkReport())
    message = encode_result(output, error="", stage_compute_s=(0.5, 0.25), hops=hops)
    result = decode_result(pb.StepResult.FromString(message.SerializeToString()))
    assert result.output == output and result.error == "" and result.stage_compute_s == (0.5, 0.25)
    assert result.hops == hops
    del message.prompt_logprobs["c"].positions[1]  # a peer's malformed result
    with pytest.raises(WireFormatError, match="prompt logprobs"):
        decode_result(message)


def test_chunk_fields_round_trip_and_are_checked():
    plan = _plan()
    hidden = RawTensor(data=bytes(4 * 3 * plan.num_tokens), dtype="float32",
                       shape=(plan.num_tokens, 3))
    message = encode_step(plan, hidden, step_num_tokens=plan.num_tokens + 5,
                          hops=(LinkReport(2e7, 0.05),))
    step = decode_step(pb.StepMessage.FromString(message.SerializeToString()))
    assert step.step_num_tokens == plan.num_tokens + 5 and step.hops == (LinkReport(2e7, 0.05),)
    message.step_num_tokens = plan.num_tokens - 1  # a chunk larger than its step
    with pytest.raises(WireFormatError, match="step_num_tokens"):
        decode_step(message)
    wrong_rows = encode_step(plan, RawTensor(data=bytes(12), dtype="float32", shape=(1, 3)))
    with pytest.raises(WireFormatError, match="do not match"):
        decode_step(wrong_rows)
    bad_hop = encode_step(plan, hops=(LinkReport(float("nan"), 0.0),))
    with pytest.raises(WireFormatError, match="hop report"):
        decode_step(bad_hop)


@pytest.mark.parametrize("tensor,message", [
    (pb.Tensor(data=b"\0" * 7, dtype="float32", shape=[2]), "needs 8 bytes"),
    (pb.Tensor(data=b"", dtype="object", shape=[0]), "not allowed"),
    (pb.Tensor(data=b"", dtype="float32", shape=[-1]), "invalid"),
    (pb.Tensor(data=b"", dtype="float32", shape=[1, 1, 1, 1, 0]), "invalid"),
])
def test_malformed_tensors_are_refused(tensor, message):
    with pytest.raises(WireFormatError, match=message):
        decode_tensor(tensor)


def test_malformed_steps_are_refused():
    bad_ids = encode_step(_plan())
    bad_ids.batch[1].request_id = "a"
    with pytest.raises(WireFormatError, match="twice"):
        decode_step(bad_ids)
    bad_params = encode_step(_plan())
    bad_params.new_requests[0].sampling.top_p = 5.0
    with pytest.raises(WireFormatError, match="top_p"):
        decode_step(bad_params)
    negative = encode_step(_plan())
    negative.batch[0].num_tokens = 0
    with pytest.raises(WireFormatError, match="num_tokens"):
        decode_step(negative)


def test_generated_protobuf_modules_are_current(tmp_path):
    (tmp_path / "molink" / "transport").mkdir(parents=True)
    proto = "molink/transport/molink.proto"
    (tmp_path / proto).write_text((ROOT / proto).read_text())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
                    "--grpc_python_out=.", proto], cwd=tmp_path, check=True)
    for name in ("molink_pb2.py", "molink_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "molink" / "transport" / name,
                           ROOT / "molink" / "transport" / name, shallow=False), name
