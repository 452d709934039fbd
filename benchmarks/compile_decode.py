"""Does ``torch.compile`` make MoLink's decode step faster on this CPU? Eager against compiled.

Issue 18 asks for ``torch.compile`` of the decode step where it measurably helps, with the
eager path as the reference. This measures it on the benchmarks' random Llama (hidden 1024,
12 layers, GQA 16/4, vocab 8000, 151M parameters) in bfloat16, one process, greedy, EOS
ignored, 128-token prompts (the measures of ``benchmarks.cpu_dtypes``):

- ``eager``: MoLink as it runs (on a CPU with native bf16, weights packed for oneDNN);
- ``torch.compile``: each decoder layer's work around the paged attention compiled by
  inductor (``dynamic=True``: one graph for every row count), in two graphs a layer: input
  norm, q/k/v projection and rotary; then output projection, residual, norm, MLP and
  residual. The paged attention stays eager (its block tables and per-step groups are
  Python data), and the linears enter the graphs as one opaque operator (oneDNN's packed
  product, which inductor cannot lower itself), so what compiling can win is the small ops
  between them: norms, rotary, SiLU, residual adds, and the Python that calls them.

Each mode runs in its own subprocess, the modes interleaved ``--repeat`` times (medians);
each run's greedy tokens for one prompt are compared with eager's (how many agree before the
first that differs: by default inductor keeps the intermediates of fused bf16 operations
in float32, where eager rounds each to bf16, as Hugging Face does). The bound it is
measured against: the eager row of the same run. The compiled mode is a measurement, not a
MoLink option: where it wins nothing, MoLink stays eager.

    python -m benchmarks.compile_decode            # writes benchmarks/results/compile_decode.md
    python -m benchmarks.compile_decode --quick    # fewer tokens, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cpu_dtypes import add_mode_arguments, prompts_of, rates, run_mode
from benchmarks.gguf_smollm2.report import agreement

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("eager", "torch.compile")
COLUMNS = (("prefill 128 tok (ms)", "prefill_ms"), ("TPOT (ms)", "tpot_ms"),
           ("16 at once (tok/s)", "batch16_tok_s"),
           ("16 at once, decode (tok/s)", "batch16_decode_tok_s"))


def compile_layers() -> None:
    """Route every ``DecoderLayer`` (sequential layout) through two compiled graphs around
    its paged attention; packed linears become one opaque operator inside them."""
    import torch

    from molink.model.layers import packed_linear
    from molink.model.layers.decoder import DecoderLayer

    @torch.library.custom_op("molink_bench::packed_linear", mutates_args=(),
                             schema="(Tensor x, Tensor packed, Tensor? bias) -> Tensor")
    def packed_linear_op(x, packed, bias):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @packed_linear_op.register_fake
    def _(x, packed, bias):
        return x.new_empty(*x.shape[:-1], packed.shape[0])

    packed_linear.packed_product = torch.ops.molink_bench.packed_linear

    def before_attention(layer, h, cos, sin):
        x = layer.input_layernorm(h)
        attn = layer.self_attn
        q, k, v = attn._qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = q.reshape(x.shape[0], attn.num_heads, attn.head_dim)
        k = k.reshape(x.shape[0], attn.num_kv_heads, attn.head_dim)
        v = v.reshape(x.shape[0], attn.num_kv_heads, attn.head_dim)
        if attn.has_qk_norm:
            q, k = attn._q_norm(q), attn._k_norm(k)
        return attn._rope(q, cos, sin), attn._rope(k, cos, sin), v

    def after_attention(layer, h, attended):
        h = h + layer.self_attn._out_proj(attended)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    first = torch.compile(before_attention, dynamic=True)
    second = torch.compile(after_attention, dynamic=True)

    def forward(self, h, cos, sin, meta):
        assert self.sequential and self.self_attn.rotate is not None, "Llama-like layers only"
        q, k, v = first(self, h, cos, sin)
        return second(self, h, self.self_attn.attn(q, k, v, meta))

    DecoderLayer.forward = forward


def measure(mode: str, directory: str, output_tokens: int) -> dict:
    """One mode, in this process: ``cpu_dtypes``' measures, the compile warm-up's seconds and
    the greedy tokens of one prompt."""
    from molink import LLM, SamplingParams

    if mode == "torch.compile":
        compile_layers()
    llm = LLM(model=directory, dtype="bfloat16", device="cpu")

    def generate(batch, tokens):
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        return llm.generate([{"prompt_token_ids": p} for p in batch], params)

    def run(batch, tokens):
        start = time.perf_counter()
        generate(batch, tokens)
        return time.perf_counter() - start

    prompts = prompts_of(16)
    warm_up = run(prompts[:1], 2) + run(prompts, 2)  # compiles every shape it will meet
    prefill = min(run(prompts[:1], 1) for _ in range(3))
    row = rates(run, prompts, prefill, output_tokens)
    tokens = generate(prompts[:1], output_tokens)[0].outputs[0].token_ids
    return {**row, "warm_up_s": warm_up, "tokens": list(tokens)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 output tokens, prints only")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OMP threads per run (default: every core)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of every mode, interleaved; the table shows medians "
                             "(default: %(default)s)")
    add_mode_arguments(parser)  # the subprocess of one mode
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.model, args.tokens)))
        return 0
    tokens = 16 if args.quick else 64
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        from benchmarks.random_llama import build_model

        directory = str(build_model(Path(tmp) / "llama151m", hidden=1024, layers=12, vocab=8000))
        runs = {mode: [] for mode in MODES}
        for _ in range(max(1, args.repeat)):  # interleaved: a busy spell hits every mode
            for mode, mode_runs in runs.items():
                mode_runs.append(run_mode(mode, directory, tokens, args.threads,
                                                    "benchmarks.compile_decode"))
    text = _table(runs)
    print(text)
    if not args.quick:
        _write(text, args, tokens, time.perf_counter() - started)
    return 0


def _table(runs: dict[str, list[dict]]) -> str:
    rows = {mode: {key: statistics.median(run[key] for run in mode_runs)
                   for _, key in (*COLUMNS, ("", "warm_up_s"))}
            for mode, mode_runs in runs.items()}
    base = rows["eager"]
    lines = ["| mode | " + " | ".join(f"{title} | x eager" for title, _ in COLUMNS)
             + " | warm-up (s) | greedy tokens before the first that differs from eager's |",
             "|---|" + "---|---|" * len(COLUMNS) + "---|---|"]
    reference = runs["eager"][0]["tokens"]
    for mode, r in rows.items():
        cells = [f"{r[key]:.1f} | {r[key] / base[key]:.2f}" for _, key in COLUMNS]
        agree = min(agreement(run["tokens"], reference) for run in runs[mode])
        lines.append(f"| {mode} | " + " | ".join(cells)
                     + f" | {r['warm_up_s']:.1f} | {agree} of {len(reference)} |")
    return "\n".join(lines)


def _write(table: str, args, tokens: int, seconds: float) -> None:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    command = "python -m benchmarks.compile_decode" + (
        f" --threads {args.threads}" if args.threads != os.cpu_count() else "") + (
        f" --repeat {args.repeat}" if args.repeat != 3 else "")
    import torch

    text = "\n".join([
        "# torch.compile of the decode step against eager, one process", "",
        (f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{seconds / 60:.0f} minutes; torch {torch.__version__}, {args.threads} threads)"), "",
        ("Model: random Llama 151M (hidden 1024, 12 layers, GQA 16/4, vocab 8000) in bfloat16 "
        f"(this CPU's fastest dtype, `cpu_dtypes_native_bf16.md`); prompts of 128 random token "
        f"ids; {tokens} output tokens, greedy, EOS ignored. Each mode in its own process, "
        f"{args.repeat} runs interleaved, medians; the bound: the eager row. What is compiled: "
        "see the docstring of `benchmarks/compile_decode.py`. Warm-up: two short generations "
        "(one request, then 16), compiling included."), "",
        table, "", "Machine:", "", "```", lscpu.strip(), "```", ""])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compile_decode.md").write_text(text)
    print(f"wrote {RESULTS / 'compile_decode.md'}")


if __name__ == "__main__":
    sys.exit(main())
