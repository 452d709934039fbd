"""One OpenMP team per serving process (runtime/intra_op.py): a thread that called
``serial_here`` starts no team of its own, and work run in its own thread takes its team
along when it ends. Checked in a child process with 2 OpenMP threads (the test process's
own threads must keep theirs), by counting the child's OS threads: a team is its threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from molink.runtime.intra_op import _openmp

CHILD = textwrap.dedent("""
    import asyncio, concurrent.futures, json, os, time
    import torch
    from molink.runtime.intra_op import in_own_thread, run_in_own_thread, serial_here

    def threads():
        return len(os.listdir("/proc/self/task"))

    def left_over(before):  # threads still there beyond ``before``, once exits settle
        deadline = time.monotonic() + 5
        while threads() > before and time.monotonic() < deadline:
            time.sleep(0.01)
        return threads() - before

    def big_op():
        return float((torch.ones(2048, 2048) * 2).sum())  # parallel: far above one grain

    pools = []  # alive to the end: their threads stay, the counts below stay exact

    def in_pool(initializer=None):
        pool = concurrent.futures.ThreadPoolExecutor(1, initializer=initializer)
        pools.append(pool)
        pool.submit(lambda: None).result()  # the pool's thread exists
        before = threads()
        result = pool.submit(big_op).result()
        width = pool.submit(torch.get_num_threads).result()
        return {"added": threads() - before, "width": width, "result": result}

    base = threads()
    serial = in_pool(serial_here)
    plain = in_pool()
    before = threads()
    own = run_in_own_thread(big_op)
    after_own = left_over(before)
    before = threads()
    awaited = asyncio.run(in_own_thread(big_op))
    after_await = left_over(before)
    print(json.dumps({"serial": serial, "plain": plain, "own": own, "after_own": after_own,
                      "awaited": awaited, "after_await": after_await,
                      "main_width": torch.get_num_threads()}))
""")


@pytest.mark.skipif(_openmp() is None, reason="PyTorch runs without an OpenMP runtime here")
def test_serial_threads_start_no_team_and_own_threads_take_theirs_along():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = float(2048 * 2048 * 2)
    # a plain thread's parallel operator starts a team: one more OpenMP thread stays
    assert seen["plain"] == {"added": 1, "width": 2, "result": expected}
    # after serial_here the same operator runs on the thread itself, same result
    assert seen["serial"] == {"added": 0, "width": 1, "result": expected}
    # work in its own thread: nothing stays behind, sync or awaited
    assert seen["own"] == seen["awaited"] == expected
    assert seen["after_own"] == seen["after_await"] == 0
    assert seen["main_width"] == 2  # other threads keep their width


@pytest.mark.skipif(_openmp() is None, reason="PyTorch runs without an OpenMP runtime here")
def test_the_head_serializes_on_one_core_and_computes_on_every_one(tiny_model_dir):
    from tests.coordinator.pipeline_harness import make_head

    head = make_head(tiny_model_dir("llama"), (0, 2))
    pools = head.loop._serialize_pool, head.loop._compute_pool
    serialize, compute = (pool.submit(torch.get_num_threads).result() for pool in pools)
    assert serialize == 1
    assert compute == torch.get_num_threads()  # this (test) thread's width, untouched


@pytest.mark.skipif(_openmp() is None, reason="PyTorch runs without an OpenMP runtime here")
def test_threads_option_sets_the_width_of_threads_started_after_it():
    """``--threads 1`` (``use_threads``) on a machine whose default is 2: the compute thread
    started afterwards runs its operators on one core and starts no team; without it, 2."""
    child = textwrap.dedent("""
        import concurrent.futures, json, os, sys
        import torch
        from molink.runtime.intra_op import serial_here, use_threads

        use_threads(int(sys.argv[1]) if len(sys.argv) > 1 else None)
        serial_here()  # as serve and join do, after it
        pool = concurrent.futures.ThreadPoolExecutor(1)
        pool.submit(lambda: None).result()
        before = len(os.listdir("/proc/self/task"))
        pool.submit(lambda: (torch.ones(2048, 2048) * 2).sum()).result()
        print(json.dumps({"width": pool.submit(torch.get_num_threads).result(),
                          "added": len(os.listdir("/proc/self/task")) - before}))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="2")

    def run(*argv: str) -> dict:
        proc = subprocess.run([sys.executable, "-c", child, *argv], env=env,
                              capture_output=True, text=True, timeout=120, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert run("1") == {"width": 1, "added": 0}
    assert run() == {"width": 2, "added": 1}
