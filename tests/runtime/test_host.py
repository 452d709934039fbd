"""Stages that compute on one machine's CPUs share its cores: the head says so, and warns
once that each process should run its share of threads."""

from __future__ import annotations

import logging

from molink.runtime import host
from molink.runtime.host import shared_cores


def test_shared_cores_only_when_every_compute_is_one_machines_cpu(caplog, monkeypatch):
    monkeypatch.setattr(host, "_warned", set())
    same = [("box:1", "cpu", 8), ("box:1", "cpu", 8), ("box:1", "cpu", 8)]
    with caplog.at_level(logging.WARNING, logger="molink.runtime.host"):
        assert shared_cores(same) == 8
        assert shared_cores(same) == 8
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, "warned once per machine and count"
    assert "3 processes" in warnings[0] and "OMP_NUM_THREADS=2" in warnings[0]
    assert shared_cores([("box:1", "cpu", 8)]) is None  # one process alone
    assert shared_cores([("box:1", "cpu", 8), ("other:2", "cpu", 8)]) is None
    assert shared_cores([("box:1", "cuda", 8), ("box:1", "cuda", 8)]) is None
    assert shared_cores([("", "cpu", 8), ("", "cpu", 8)]) is None  # hosts unknown
