"""Stages that compute on one machine's CPUs share its cores: the head says so, and warns
once that each process should run its share of threads; processes pinned to CPUs of their
own (taskset, a container's cpuset) do not share them."""

from __future__ import annotations

import logging
import os

import pytest

from molink.runtime import host
from molink.runtime.host import cpu_set, parse_cpu_set, shared_cores


def test_shared_cores_only_when_every_compute_is_one_machines_cpu(caplog, monkeypatch):
    monkeypatch.setattr(host, "_warned", set())
    same = [("box:1", "cpu", 8, "", 0)] * 3
    with caplog.at_level(logging.WARNING, logger="molink.runtime.host"):
        assert shared_cores(same) == 8
        assert shared_cores(same) == 8
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, "warned once per machine and count"
    assert "3 processes" in warnings[0] and "OMP_NUM_THREADS=2" in warnings[0]
    assert shared_cores([("box:1", "cpu", 8, "", 0)]) is None  # one process alone
    assert shared_cores([("box:1", "cpu", 8, "", 0), ("other:2", "cpu", 8, "", 0)]) is None
    assert shared_cores([("box:1", "cuda", 8, "", 0), ("box:1", "cuda", 8, "", 0)]) is None
    assert shared_cores([("", "cpu", 8, "", 0), ("", "cpu", 8, "", 0)]) is None  # hosts unknown


def test_no_warning_where_every_process_computes_with_its_share(caplog, monkeypatch):
    """Processes known to compute with no more threads than their share (``molink demo``,
    ``--threads``) still share the cores, but nothing needs saying; one process with more
    threads than its share, or one whose threads are unknown (an older peer), is warned."""
    monkeypatch.setattr(host, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="molink.runtime.host"):
        assert shared_cores([("box:1", "cpu", 2, "", 1)] * 3) == 2
        assert shared_cores([("box:1", "cpu", 8, "", 2)] * 3) == 8
        assert not caplog.records
        assert shared_cores([("box:1", "cpu", 8, "", 2)] * 3 + [("box:1", "cpu", 8, "", 8)]) == 8
        assert len(caplog.records) == 1 and "4 processes" in caplog.records[0].getMessage()
        assert shared_cores([("box:1", "cpu", 8, "", 1), ("box:1", "cpu", 8, "", 0)]) == 8
        assert len(caplog.records) == 2


def test_processes_pinned_to_cpus_of_their_own_do_not_share_them(caplog, monkeypatch):
    monkeypatch.setattr(host, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="molink.runtime.host"):
        own = [("box:1", "cpu", 4, "0-3", 0), ("box:1", "cpu", 4, "4-7", 0),
               ("box:1", "cpu", 4, "8,9,10-11", 0)]
        assert shared_cores(own) is None
        assert not caplog.records, "no warning where nothing is shared"
        # one overlapping CPU: they compete, on the 7 CPUs they have between them
        assert shared_cores([("box:1", "cpu", 4, "0-3", 0), ("box:1", "cpu", 4, "3-6", 0)]) == 7
        # a set unknown (a peer of an older version, not Linux): it may use any core
        assert shared_cores([("box:1", "cpu", 16, "0-3", 0), ("box:1", "cpu", 16, "", 0)]) == 16
    assert len(caplog.records) == 1


@pytest.mark.parametrize("text, cpus", [
    ("0", {0}), ("0-3", {0, 1, 2, 3}), ("1,3-4,8", {1, 3, 4, 8}),
    ("", None), ("3-1", None), ("a", None), ("-1", None), ("1,,2", None), ("0-99999999", None),
    ("0," * 3000, None),  # longer than any real machine's list
])
def test_cpu_sets_from_peers_are_parsed_strictly(text, cpus):
    assert parse_cpu_set(text) == (None if cpus is None else frozenset(cpus))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_this_process_cpu_set_round_trips():
    assert parse_cpu_set(cpu_set()) == frozenset(os.sched_getaffinity(0))
