"""One team of intra-op threads per serving process.

PyTorch runs a CPU operator on several cores through OpenMP (libgomp in the Linux wheels),
and OpenMP gives every thread that starts a parallel operator a team of its own, whose
threads stay for the life of that thread. Once a process holds more OpenMP threads than it
has CPUs, libgomp stops spinning between parallel regions (its throttled spin) and every
team wakes slowly for each of the hundreds of operators of a step. Measured on a 2-core
Xeon, bf16, one stream: a decode step takes 20 ms while one thread has run parallel
operators, 29 ms once a second one has too (and stays there); ``molink serve`` loaded the
model on one thread, stepped it on another and cast activations on a third: 30 ms.

So a serving process keeps one team, that of the thread that computes steps:

- ``serial_here()``: the calling thread runs every operator on one core (OpenMP's setting
  for this thread only; PyTorch's ``set_num_threads`` would also change the default of
  threads not started yet, the compute thread among them). For the event loop and the
  serializers, whose operators are small or few.
- ``use_threads(n)`` (``--threads``): the width of the threads that compute, set before any
  thread starts.
- ``in_own_thread`` / ``run_in_own_thread``: work that wants every core but runs once
  (loading and converting weights, measuring a layer) in a thread that ends with it,
  taking its team along.

Where no OpenMP runtime is loaded (another platform, another build), both are plain.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")
T = TypeVar("T")


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime this process has loaded (PyTorch's), or None."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # no /proc (macOS, Windows): threads stay as they are
        return None
    for line in maps:
        path = line.rpartition(" ")[2]
        if Path(path).name.startswith(OPENMP_RUNTIMES):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


def use_threads(count: int | None) -> None:
    """Threads for every thread's operators from now on (``--threads``; None: PyTorch's
    default, ``OMP_NUM_THREADS`` or every core). Call it first: threads that already ran an
    operator keep their width."""
    if count is not None:
        torch.set_num_threads(count)


def compute_threads() -> int:
    """The width a thread started now computes with (``use_threads``, ``OMP_NUM_THREADS`` or
    every core), whatever ``serial_here`` set for the calling thread."""
    return run_in_own_thread(torch.get_num_threads)


def serial_here() -> None:
    """Run this thread's operators on one core, leaving other threads' settings alone."""
    runtime = _openmp()
    if runtime is None:
        return
    torch.get_num_threads()  # PyTorch's once-per-thread setup first, or it would undo this
    runtime.omp_set_num_threads(1)


def run_in_own_thread(fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` in a thread that ends when it returns (its OpenMP team with it)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"molink-{_name(fn)}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


async def in_own_thread(fn: Callable[..., T], *args) -> T:
    """``await`` form of ``run_in_own_thread``: the event loop keeps running meanwhile (the
    executor thread that waits runs no operator, so it starts no team)."""
    return await asyncio.to_thread(run_in_own_thread, fn, *args)


def _name(fn) -> str:
    return getattr(fn, "__name__", "work").strip("_") or "work"
