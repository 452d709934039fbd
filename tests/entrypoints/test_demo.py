"""The demo's code path: a local three-stage pipeline streams an answer and cleans up."""

from __future__ import annotations

import asyncio

from molink import SamplingParams
from molink.entrypoints import demo


def test_split_layers_tiles_the_model():
    assert demo.split_layers(6) == [(0, 2), (2, 4), (4, 6)]
    assert demo.split_layers(4) == [(0, 1), (1, 3), (3, 4)]
    assert demo.split_layers(2) == [(0, 1), (1, 2)]


def test_demo_runs_a_three_stage_pipeline(tiny_model_dir, capsys):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    code = asyncio.run(demo.run(str(tiny_model_dir("llama")), "Hello", params, "float32", "cpu"))
    out = capsys.readouterr().out
    assert code == 0
    assert "pipeline: head layers 0:1 -> layers 1:3 at 127.0.0.1:" in out
    assert "-> layers 3:4 at 127.0.0.1:" in out
    assert sum(line.startswith("  molink join") for line in out.splitlines()) == 2
