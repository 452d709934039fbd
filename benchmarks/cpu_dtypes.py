"""Single-process speed per dtype on this CPU: prefill, decode, and a batch of 16.

The issue-18 model (random Llama: hidden 1024, 12 layers, GQA 16/4, vocab 8000, 151M
parameters), one process, greedy, EOS ignored, 128-token prompts of random ids. Each mode
runs in its own subprocess (a clean heap), side by side in one run:

- ``float32``: weights and products in float32 (4 bytes a weight), a decode batch's products
  in the orientation MKL is fast at (``model/layers/cpu_linear.py``);
- ``float32 (plain linears)``: the same with PyTorch's ``nn.Linear`` (what that change buys);
- ``bfloat16 (plain)``: 16-bit weights and 16-bit products (what PyTorch does unaided);
- ``bfloat16 (no fused kernels)``: on a CPU without native bf16, 16-bit weights, products
  of 4 rows or more widened to float32 in PyTorch (``model/layers/cpu_linear.py``), fewer
  rows in bf16; with native bf16 (AVX512-BF16, AMX), the same as ``plain``;
- ``bfloat16`` and ``float16``, MoLink's default: without native bf16, 16-bit weights
  widened in registers by MoLink's compiled kernel up to 32 rows
  (``model/layers/fused16.py``), as above for more; with native bf16, weights packed once
  at load (``model/layers/packed_linear.py``) for MoLink's AMX kernel where the CPU has AMX
  (``model/layers/int_amx.c``), else for oneDNN; where the fused kernels run
  (``model/layers/gemm16.c``), decode steps attend over the KV cache in place and norms,
  RoPE and SwiGLU's gate take one call each; with AMX, a decode step runs all layers in one
  call to those kernels (``model/layers/decode_layers.c``);
- ``bfloat16 (layer by layer)``: the same kernels called module by module from Python (the
  default before ``decode_layers.c``);
- ``bfloat16 (oneDNN, SDPA)``: with native bf16, the default before the AMX kernel and the
  decode step's kernels: oneDNN's packed products, PyTorch's SDPA on gathered blocks,
  PyTorch's operators for norms, RoPE and SwiGLU;
- ``transformers`` ``generate`` in float32 and bfloat16 on the same weights, as the reference;
- not by default, weights quantized at load (``--quantization``) with bf16 activations:
  ``int8`` and ``int4`` (groups of 128) as MoLink multiplies them on this CPU (its AMX kernel,
  ``model/layers/int_amx.c``, where the CPU has AMX), and ``... (PyTorch kernels)`` with
  PyTorch's int8 / int4 weight-only kernels instead. They are weight formats, not dtypes:
  the comparison with ``transformers`` leaves them out.

Measured: prefill (128 tokens, one request: the time to the first token), decode time per
token for one request (TPOT), generated tokens/s for 16 requests at once (prefill included),
and the decode rate of those 16 (tokens after the first over the time after the 16
prefills). The bounds it is measured against: the float32 row of the same run, and the
memory floor of a decode step (every weight but the input embeddings read once, at the read
bandwidth this machine measures with the same threads).

    python -m benchmarks.cpu_dtypes            # writes benchmarks/results/cpu_dtypes.md
    python -m benchmarks.cpu_dtypes --output cpu_dtypes_native_bf16.md  # another machine
    python -m benchmarks.cpu_dtypes --quick    # fewer tokens, prints only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("float32", "float32 (plain linears)", "bfloat16 (plain)",
         "bfloat16 (no fused kernels)", "bfloat16 (oneDNN, SDPA)", "bfloat16 (layer by layer)",
         "bfloat16", "float16",
         "transformers float32", "transformers bfloat16")
QUANTIZED_MODES = ("int8", "int8 (PyTorch kernels)", "int4", "int4 (PyTorch kernels)")
PROMPT_TOKENS = 128
BANDWIDTH = "read bandwidth"  # a subprocess measuring the machine, not a row


def measure(mode: str, directory: str, output_tokens: int) -> dict:
    """One mode, in this process: see ``rates``."""
    if mode == BANDWIDTH:
        return {"read_gb_s": read_bandwidth_gb_s()}
    prompts = prompts_of(16)
    if mode.startswith("transformers"):
        return _measure_transformers(mode.split()[1], directory, prompts, output_tokens)
    from molink import LLM, SamplingParams
    from molink.model import loader

    if mode == "bfloat16 (plain)":
        loader.cpu_lacks_native_bf16 = lambda: False  # no float32 products: PyTorch unaided
        os.environ["MOLINK_CPU_KERNELS"] = "0"
    if mode == "float32 (plain linears)":
        loader.use_cpu_linears = lambda model: 0
    if mode == "bfloat16 (no fused kernels)":
        os.environ["MOLINK_CPU_KERNELS"] = "0"
    if mode == "bfloat16 (oneDNN, SDPA)":
        from molink.model.layers import packed_linear

        packed_linear.amx_kernel = lambda: None
        loader.use_decode_kernel = lambda model, kernel: 0
        loader.use_cpu_operators = lambda model, kernel: 0
    if mode == "bfloat16 (layer by layer)":
        loader.use_decode_layers = lambda model, fused: 0
    if mode in QUANTIZED_MODES:
        if mode.endswith("(PyTorch kernels)"):
            from molink.model.layers import int_amx

            int_amx.kernels = lambda: None
        llm = LLM(model=directory, dtype="bfloat16", device="cpu",
                  quantization=mode.split()[0])
    else:
        llm = LLM(model=directory, dtype=mode.split()[0], device="cpu")

    def run(batch, tokens):
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in batch], params)
        return time.perf_counter() - start

    run(prompts[:1], 2)  # warm-up
    prefill = min(run(prompts[:1], 1) for _ in range(3))
    return rates(run, prompts, prefill, output_tokens)


def rates(run, prompts: list[list[int]], prefill: float, output_tokens: int) -> dict:
    """``run(prompts, tokens)`` -> seconds: one stream's TPOT, 16 at once with and without
    their prefills."""
    one = run(prompts[:1], output_tokens + 1)
    batch = run(prompts, output_tokens)
    batch_prefill = min(run(prompts, 1) for _ in range(2))
    return {"prefill_ms": prefill * 1e3, "tpot_ms": (one - prefill) / output_tokens * 1e3,
            "batch16_tok_s": 16 * output_tokens / batch,
            "batch16_decode_tok_s": 16 * (output_tokens - 1) / (batch - batch_prefill)}


def read_bandwidth_gb_s(mib: int = 512, repeats: int = 5) -> float:
    """How fast this process reads memory with its threads: the best of ``torch.sum`` and a
    matrix-vector product (MKL's streaming kernel) over float32 data far larger than these
    machines' last-level caches, best of ``repeats`` each (float32 sums read faster than
    bf16 ones here, so this is the faster reading)."""
    import torch

    data = torch.ones(mib * 2 ** 18, dtype=torch.float32)
    matrix, vector = data.view(-1, 1024), torch.ones(1024)
    best = float("inf")
    for read in (data.sum, lambda: torch.mv(matrix, vector)):
        for _ in range(repeats):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return data.numel() * data.element_size() / best / 1e9


def decode_weight_count(directory: str) -> int:
    """Weights a decode step reads: all but the input embeddings (a step gathers one row of
    those per token)."""
    from safetensors import safe_open

    total = 0
    for path in Path(directory).glob("*.safetensors"):
        with safe_open(str(path), "pt") as tensors:
            total += sum(math.prod(tensors.get_slice(name).get_shape())
                         for name in tensors.keys()  # noqa: SIM118 - safe_open has no __iter__
                         if "embed_tokens" not in name)
    return total


def floor_section(rows: dict, bandwidth_gb_s: float, weights: int) -> str:
    """The memory floor of one stream's decode step: every weight read once per token at the
    measured read bandwidth, per weight width; and what 2x transformers' best TPOT asks."""
    floors = {name: weights * width / (bandwidth_gb_s * 1e9) * 1e3
              for name, width in (("16-bit", 2), ("float32", 4))}
    lines = [f"Memory floor: a decode step reads {weights / 1e6:.1f}M weights (all but the "
             f"input embeddings); this machine reads {bandwidth_gb_s:.1f} GB/s (the best of "
             "`torch.sum` and `torch.mv` over 512 MiB of float32, same threads), so one "
             "stream's TPOT is at least " + ", ".join(f"{ms:.1f} ms with {name} weights"
                                                      for name, ms in floors.items()) + "."]
    ours = [r["tpot_ms"] for m, r in rows.items()
            if not m.startswith("transformers") and m not in QUANTIZED_MODES]
    lines.append(f"MoLink's best TPOT in a 16- or 32-bit dtype, {min(ours):.1f} ms, is "
                 f"{min(ours) / floors['16-bit']:.2f}x the 16-bit floor.")
    quantized = {m: r["tpot_ms"] for m, r in rows.items() if m in QUANTIZED_MODES}
    for bits in (8, 4):
        best = min((ms for m, ms in quantized.items() if m.startswith(f"int{bits}")),
                   default=None)
        if best is not None:  # the same weights at `bits` bits, scales aside
            floor = floors["16-bit"] * bits / 16
            lines.append(f"With {bits}-bit weights the floor is {floor:.1f} ms; the best "
                         f"int{bits} TPOT, {best:.1f} ms, is {best / floor:.2f}x it.")
    theirs = [r["tpot_ms"] for m, r in rows.items() if m.startswith("transformers")]
    if theirs:
        target = min(theirs) / 2
        lines.append(f"Twice transformers' best TPOT is {target:.1f} ms: "
                     f"{target / floors['16-bit']:.2f}x the 16-bit floor.")
    return " ".join(lines)


def prompts_of(count: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return [torch.randint(10, 7990, (PROMPT_TOKENS,), generator=generator).tolist()
            for _ in range(count)]


def _measure_transformers(dtype: str, directory: str, prompts, output_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()

    def run(batch, tokens):
        ids = torch.tensor(batch)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, pad_token_id=3)
        return time.perf_counter() - start

    run(prompts[:1], 2)
    prefill = min(run(prompts[:1], 1) for _ in range(3))
    return rates(run, prompts, prefill, output_tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 output tokens, prints only")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OMP threads per run (default: every core)")
    parser.add_argument("--modes", nargs="+", choices=MODES + QUANTIZED_MODES,
                        default=list(MODES), metavar="MODE",
                        help="which rows (default: all dtypes, no quantized weights; float32 "
                             "always)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of every mode, interleaved; the table shows medians")
    parser.add_argument("--output", default="cpu_dtypes.md",
                        help="file name under benchmarks/results (default: %(default)s)")
    add_mode_arguments(parser)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.model, args.tokens)))
        return 0
    tokens = 16 if args.quick else 64
    with tempfile.TemporaryDirectory() as tmp:
        from benchmarks.random_llama import build_model

        directory = str(build_model(Path(tmp) / "llama151m", hidden=1024, layers=12, vocab=8000))
        modes = ["float32", *(m for m in MODES + QUANTIZED_MODES
                              if m in args.modes and m != "float32")]
        weights = decode_weight_count(directory)
        runs = {mode: [] for mode in [*modes, BANDWIDTH]}
        for _ in range(max(1, args.repeat)):  # interleaved: a busy spell hits every mode
            for mode, mode_runs in runs.items():
                mode_runs.append(run_mode(mode, directory, tokens, args.threads))
    rows = {mode: {key: statistics.median(run[key] for run in mode_runs)
                   for key in mode_runs[0]} for mode, mode_runs in runs.items()}
    bandwidth = rows.pop(BANDWIDTH)["read_gb_s"]
    table = _table(rows) + "\n\n" + floor_section(rows, bandwidth, weights)
    print(table)
    if not args.quick:
        _write(table, args, tokens)
    return 0


def add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden options ``run_mode`` starts the subprocess of one mode with."""
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)


def run_mode(mode: str, directory: str, tokens: int, threads: int,
             module: str = "benchmarks.cpu_dtypes") -> dict:
    """``python -m module --mode mode ...`` in a subprocess (a clean heap): its JSON row."""
    print(f"measuring {mode} ...", file=sys.stderr, flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", module, "--mode", mode,
                           "--model", directory, "--tokens", str(tokens)], env=env,
                          capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {mode}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()
                                    if isinstance(v, float)), file=sys.stderr, flush=True)
    return row


def _table(rows: dict) -> str:
    base = rows["float32"]
    columns = (("prefill 128 tok (ms)", "prefill_ms", 0), ("TPOT (ms)", "tpot_ms", 1),
               ("16 at once (tok/s)", "batch16_tok_s", 1),
               ("16 at once, decode (tok/s)", "batch16_decode_tok_s", 1))
    lines = ["| mode | " + " | ".join(f"{title} | x float32" for title, _, _ in columns) + " |",
             "|---|" + "---|---|" * len(columns)]
    for mode, r in rows.items():
        cells = [f"{r[key]:.{digits}f} | {r[key] / base[key]:.2f}" for _, key, digits in columns]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _against_transformers(rows)


def _against_transformers(rows: dict) -> str:
    """Each side in the dtype it is fastest in on this machine, per measure."""
    ours = {m: r for m, r in rows.items()
            if not m.startswith("transformers") and m not in QUANTIZED_MODES}
    theirs = {m: r for m, r in rows.items() if m.startswith("transformers")}
    if not theirs:
        return ""
    lines = ["| decode, best dtype each | MoLink | transformers | MoLink speed-up |",
             "|---|---|---|---|"]
    for title, key, lower_is_better in (("one stream, TPOT (ms)", "tpot_ms", True),
                                        ("16 at once (tok/s)", "batch16_decode_tok_s", False)):
        pick = min if lower_is_better else max
        a = pick(ours.items(), key=lambda item: item[1][key])
        b = pick(theirs.items(), key=lambda item: item[1][key])
        ratio = b[1][key] / a[1][key] if lower_is_better else a[1][key] / b[1][key]
        lines.append(f"| {title} | {a[1][key]:.1f} ({a[0]}) | {b[1][key]:.1f} ({b[0]}) | "
                     f"{ratio:.2f}x |")
    return "\n".join(lines)


def _write(table: str, args, tokens: int) -> None:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    command = "python -m benchmarks.cpu_dtypes" + (f" --threads {args.threads}"
                                                   if args.threads != os.cpu_count() else "")
    if set(args.modes) != set(MODES):
        command += " --modes " + " ".join(shlex.quote(m) for m in args.modes)
    if args.repeat > 1:
        command += f" --repeat {args.repeat}"
    if args.output != "cpu_dtypes.md":
        command += f" --output {shlex.quote(args.output)}"
    text = "\n".join([
        "# CPU dtypes: prefill, decode and batch speed per dtype, one process", "",
        f"Command: `{command}` ({shlex.quote(sys.executable)}; {args.threads} threads)", "",
        f"Model: random Llama 151M (hidden 1024, 12 layers, GQA 16/4, vocab 8000); prompts of "
        f"{PROMPT_TOKENS} random token ids; {tokens} output tokens, greedy, EOS ignored. Each "
        "row in its own process, side by side in one run"
        + (f" ({args.repeat} runs of every row, interleaved; medians)" if args.repeat > 1
           else "") + "; the bound: the float32 row.", "",
        table, "", "Machine:", "", "```", lscpu.strip(), "```", ""])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.output).write_text(text)
    print(f"wrote {RESULTS / args.output}")


if __name__ == "__main__":
    sys.exit(main())
