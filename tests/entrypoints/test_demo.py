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


def test_main_job_prints_readable_text_from_the_bundled_model(capsys):
    """The README's first command runs this: bundled model, 3-stage pipeline, a request."""
    from molink.entrypoints.cli import DEFAULT_MODEL_DIR, DEMO_PROMPT

    params = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.2, seed=0,
                            max_tokens=48)
    code = asyncio.run(demo.run(str(DEFAULT_MODEL_DIR), DEMO_PROMPT, params, "auto", "cpu"))
    out = capsys.readouterr().out
    assert code == 0
    text = out.split(DEMO_PROMPT, 1)[1].split("The head served", 1)[0]
    words = text.lower().replace(",", " ").replace(".", " ").split()
    assert len(words) >= 20
    common = {"the", "a", "is", "of", "to", "and", "in", "an", "be", "are", "by", "this"}
    assert sum(w in common for w in words) >= 5  # English-like, not random tokens
    assert sum(c.isascii() and (c.isalnum() or c in " ,.'\"():\n-*") for c in text) > 0.9 * len(text)
