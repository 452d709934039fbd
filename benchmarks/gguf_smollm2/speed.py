"""Decode tokens/s and weight memory, one fresh child process per model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.gguf_smollm2.common import SPEED_PROMPTS, chat_ids, log


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(model: str, dtype: str, batch: int, max_tokens: int) -> None:
    """Print one JSON line: RSS before/after load, resident weight bytes, decode tokens/s."""
    from molink import LLM, SamplingParams

    torch.set_num_threads(2)
    before = rss_bytes()
    start = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, device="cpu", num_kv_blocks=64, block_size=16)
    load_s = time.perf_counter() - start
    after = rss_bytes()
    executor = llm.llm_engine.executors[0]
    storages = {}
    for t in [*executor.model.parameters(), *executor.model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    kv = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
              for t in _tensors(executor.kv_caches)}.values())
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": chat_ids(tok, q)} for q in SPEED_PROMPTS[:batch]]
    timings = {1: 0.0, max_tokens: float("nan")}
    for n in ((1, max_tokens) if max_tokens > 1 else ()):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2))  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        timings[n] = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
    decode_s = timings[max_tokens] - timings[1]
    print(json.dumps({"model": model, "dtype": dtype, "load_s": load_s, "rss_before": before,
                      "rss_after": after, "weights": sum(storages.values()), "kv": kv,
                      "prefill_s": timings[1], "decode_s": decode_s,
                      "decode_tok_s": batch * (max_tokens - 1) / decode_s if max_tokens > 1
                      else float("nan")}), flush=True)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def run_child(model: Path, dtype: str, batch: int, max_tokens: int) -> dict:
    log(f"speed/memory: fresh process, {model.name}, dtype {dtype}, {batch} x {max_tokens} tokens")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gguf_smollm2", "--child", str(model),
                          "--child-dtype", dtype, "--batch", str(batch),
                          "--max-tokens", str(max_tokens)],
                         capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    row = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"  {row['decode_tok_s']:.1f} tok/s decode, weights {row['weights'] / 2**20:.1f} MiB")
    return row
