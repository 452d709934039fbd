"""The demo's code path: a local three-stage pipeline streams an answer and cleans up."""

from __future__ import annotations

import asyncio
import logging

from molink import SamplingParams
from molink.entrypoints import demo


def assert_quiet(err: str, caplog) -> None:
    """Nothing but the answer: no traceback, no warning, from this process (the head: its
    log records) or the ``molink join`` processes (they write to the inherited stderr).
    A stream still open when a stage stopped used to end, once the event loop ended, with
    gRPC's "Exception not handled by _handle_exceptions" and two CancelledError tracebacks."""
    assert "Traceback" not in err and "CancelledError" not in err, err
    assert not [line for line in err.splitlines() if " WARNING " in line or " ERROR " in line], err
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [f"{r.levelname} {r.name}: {r.getMessage()}" for r in noisy]


def test_demo_runs_a_three_stage_pipeline(tiny_model_dir, capfd, caplog):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    code = asyncio.run(demo.run(str(tiny_model_dir("llama")), "Hello", params, "float32", "cpu"))
    out, err = capfd.readouterr()  # fd level: the stage processes' stderr too
    assert code == 0
    assert_quiet(err, caplog)
    assert "pipeline: head layers 0:2 -> layers 2:3 at 127.0.0.1:" in out
    assert "-> layers 3:4 at 127.0.0.1:" in out
    assert sum(line.startswith("  molink join") for line in out.splitlines()) == 2


def test_main_job_prints_readable_text_from_the_bundled_model(capfd, caplog):
    """The README's first command runs this: bundled model, 3-stage pipeline, a request."""
    from molink.entrypoints.cli import DEFAULT_MODEL_DIR, DEMO_PROMPT

    params = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.2, seed=0,
                            max_tokens=48)
    code = asyncio.run(demo.run(str(DEFAULT_MODEL_DIR), DEMO_PROMPT, params, "auto", "cpu"))
    out, err = capfd.readouterr()
    assert code == 0
    assert_quiet(err, caplog)
    text = out.split(DEMO_PROMPT, 1)[1].split("The head served", 1)[0]
    words = text.lower().replace(",", " ").replace(".", " ").split()
    assert len(words) >= 20
    common = {"the", "a", "is", "of", "to", "and", "in", "an", "be", "are", "by", "this"}
    assert sum(w in common for w in words) >= 5  # English-like, not random tokens
    assert sum(c.isascii() and (c.isalnum() or c in " ,.'\"():\n-*") for c in text) > 0.9 * len(text)


def test_the_readme_command_prints_no_warning_in_a_fresh_process():
    """``molink demo`` as the README runs it: a fresh interpreter whose head computes with
    PyTorch's default threads (this test process runs with one). Its stderr is empty of
    warnings: the head once took every core beside two one-thread stages and warned about
    exactly that, in the middle of the answer."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-m", "molink.entrypoints.cli", "demo",
                           "--max-tokens", "8"], capture_output=True, text=True, timeout=300,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "The head served layers" in done.stdout
    assert "Traceback" not in done.stderr and "CancelledError" not in done.stderr, done.stderr
    assert not [line for line in done.stderr.splitlines()
                if " WARNING " in line or " ERROR " in line], done.stderr


def test_a_stage_stopped_with_a_stream_open_exits_without_a_traceback(capfd, caplog):
    """What ``molink join`` does at SIGTERM while the previous hop still streams to it:
    grpc.aio's ``server.stop()`` returns before the task of the cancelled stream has
    ended; ``finish_pending_tasks`` lets it end before ``asyncio.run`` would cancel it."""
    import grpc

    from molink.entrypoints.signals import finish_pending_tasks

    async def echo(requests, context):
        try:
            async for message in requests:
                yield message
        except asyncio.CancelledError:
            return

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.S", {"F": grpc.stream_stream_rpc_method_handler(echo)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream("/t.S/F")()
            await call.write(b"x")
            assert await call.read() == b"x"
            await server.stop(grace=0.1)
            await finish_pending_tasks()

    for _ in range(3):  # without finish_pending_tasks, most runs logged the traceback
        asyncio.run(main())
    assert_quiet(capfd.readouterr().err, caplog)
