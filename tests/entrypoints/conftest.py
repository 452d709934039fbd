"""Fixtures of the HTTP tests that start ``molink`` CLI processes."""

from __future__ import annotations

import subprocess

import pytest


@pytest.fixture
def processes():
    """A list to append started processes to; each is stopped at the end, by pid."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        proc.kill()  # by pid
        proc.wait()
