"""A stage passes a small computed step on from its compute thread (a decode's activations:
no hand-off to the serializer thread), and never overtakes what waits there."""

from __future__ import annotations

import threading
import time
import types

import torch

from molink.messages import StepOutput
from molink.stage.compute import SMALL_BYTES, StageCompute, small
from molink.stage.gathering import Timings
from molink.stage.worker import _STOP, StageWorker
from molink.transport import molink_pb2 as pb
from molink.transport.codec import PART_WHOLE
from molink.transport.peers import PeerSecurity

HIDDEN = 64


class _Sender:
    """Records each submitted step and the thread that passed it on."""

    def __init__(self) -> None:
        self.submitted: list[tuple[int, str]] = []

    def wire_compression(self, native_dtype: str) -> str:
        return "none"

    def submit(self, outgoing) -> None:
        self.submitted.append((outgoing.plan.step_id, threading.current_thread().name))


class _Loop:
    def call_soon_threadsafe(self, fn, *args) -> None:
        fn(*args)  # at once, on the calling thread: the test sees who passed the step on


def _worker(sender: _Sender) -> StageWorker:
    executor = types.SimpleNamespace(is_last=False, device=torch.device("cpu"),
                                     dtype=torch.float32)
    worker = StageWorker(executor, pb.StageInfo(start_layer=2, end_layer=4),
                         PeerSecurity("token", None), "127.0.0.1:1")
    worker._sender, worker._loop = sender, _Loop()
    return worker


def _item(step_id: int, rows: int):
    plan = types.SimpleNamespace(step_id=step_id, num_tokens=rows)
    step = types.SimpleNamespace(plan=plan, epoch=0, reset=False, error="", hops=(),
                                 part=PART_WHOLE, step_num_tokens=rows)
    return step, torch.ones(rows, HIDDEN), "", Timings((0.01,), (0.0,), time.monotonic())


def test_small_steps_go_from_the_compute_thread_and_keep_their_order(monkeypatch):
    sender = _Sender()
    worker = _worker(sender)
    encode = StageCompute.encode

    def slow_encode(self, activations, hop):  # the serializer is still busy with a big step
        if activations.nbytes > SMALL_BYTES:
            time.sleep(0.2)
        return encode(self, activations, hop)

    monkeypatch.setattr(StageCompute, "encode", slow_encode)
    serializer = threading.Thread(target=worker._serialize_loop, name="serializer")
    serializer.start()
    try:
        big_rows = SMALL_BYTES // (4 * HIDDEN) + 1
        for step_id, rows in ((1, big_rows), (2, 1), (3, 16)):
            worker._to_wire(_item(step_id, rows))
        deadline = time.monotonic() + 10
        while len(sender.submitted) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        worker._to_wire(_item(4, 1))  # nothing waits now
    finally:
        worker._wire.put(_STOP)
        serializer.join(10)
    here = threading.current_thread().name
    assert sender.submitted == [(1, "serializer"), (2, "serializer"), (3, "serializer"),
                                (4, here)]


def test_what_counts_as_small():
    compute = StageCompute(types.SimpleNamespace())
    sender = _Sender()
    rows = torch.randn(16, HIDDEN, dtype=torch.bfloat16)
    assert small(rows) and small(StepOutput(1)) and small(None)
    assert not small(torch.zeros(SMALL_BYTES // 4 + 1))
    assert compute.encode_small(rows, sender) == compute.encode(rows, sender)
    assert compute.encode_small(rows, None) is None
    assert compute.encode_small(torch.zeros(SMALL_BYTES // 4 + 1), sender) is None
    assert compute.encode_small(StepOutput(1), sender) is None


def test_a_step_whose_output_cannot_be_encoded_goes_on_with_the_reason(monkeypatch):
    """On the compute thread too: the step is passed on with an error (the head fails its
    requests with it) and the thread lives on to pass the next one."""
    sender = _Sender()
    sent = []
    sender.submit = lambda outgoing: sent.append((outgoing.plan.step_id, outgoing.error,
                                                  outgoing.activations))
    worker = _worker(sender)
    encode = StageCompute.encode

    def failing_encode(self, activations, hop):
        if activations.shape[0] == 2:
            raise ValueError("no room on the wire")
        return encode(self, activations, hop)

    monkeypatch.setattr(StageCompute, "encode", failing_encode)
    worker._to_wire(_item(1, 2))
    worker._to_wire(_item(2, 1))
    assert sent[0][0] == 1 and sent[0][2] is None
    assert sent[0][1] == ("stage layers 2:4, step 1: its output could not be encoded: "
                          "ValueError: no room on the wire")
    assert sent[1][0] == 2 and sent[1][1] == "" and sent[1][2] is not None
