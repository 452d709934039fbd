"""Generated tokens/s of ``molink.LLM`` against ``transformers`` batched ``generate``.

Same CPU, same random-weight Llama model (hidden 512, 8 layers by default), same 64
requests with mixed prompt and output lengths, greedy decoding, EOS ignored.

``transformers`` runs the requests as one left-padded static batch (its batched
``generate``): every request decodes until the longest one is done. Two token counts are
reported for it: *useful* tokens (what the requests asked for — the comparable number) and
*computed* tokens (including those generated past a request's own length).

    python -m benchmarks.engine_throughput            # full run, writes benchmarks/results/
    python -m benchmarks.engine_throughput --quick    # smaller, prints only
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.random_llama import build_model
from molink import LLM, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"


WORKLOADS = {
    # prompts and outputs uniform in a range: the kindest case for a static batch
    "uniform": "prompts uniform 8-160 tokens, outputs uniform 16-128 tokens",
    # chat-like: log-normal lengths with a long tail, as in ShareGPT traces
    "sharegpt-like": "prompts log-normal (median 64, 8-384), outputs log-normal (median 40, 8-256)",
}


def make_workload(kind: str, num_requests: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts, output_lens = [], []
    for _ in range(num_requests):
        if kind == "uniform":
            prompt_len, output_len = rng.randint(8, 160), rng.randint(16, 128)
        else:
            prompt_len = min(384, max(8, round(rng.lognormvariate(math.log(64), 0.8))))
            output_len = min(256, max(8, round(rng.lognormvariate(math.log(40), 0.9))))
        prompts.append([rng.randrange(6, vocab) for _ in range(prompt_len)])
        output_lens.append(output_len)
    return prompts, output_lens


def run_molink(directory: Path, prompts, output_lens) -> tuple[float, list[list[int]]]:
    llm = LLM(model=str(directory), dtype="float32", device="cpu", max_num_batched_tokens=512)
    llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=4))  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    return elapsed, [o.outputs[0].token_ids for o in outputs]


@torch.inference_mode()
def run_transformers(directory: Path, prompts, output_lens) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    pad = 3
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generate(ids[:2, -8:], attention_mask=mask[:2, -8:], max_new_tokens=2,
                   do_sample=False, pad_token_id=pad)  # warm-up
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max(output_lens),
                         do_sample=False, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    return elapsed, [out[i, width:width + n].tolist() for i, n in enumerate(output_lens)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="16 requests, print only")
    args = parser.parse_args()
    num_requests = 16 if args.quick else args.requests
    print(f"model: random Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}; "
          f"{num_requests} requests per workload; {torch.get_num_threads()} threads", flush=True)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = build_model(Path(tmp), args.hidden, args.layers, args.vocab)
        for kind, description in WORKLOADS.items():
            prompts, output_lens = make_workload(kind, num_requests, args.vocab)
            print(f"\n## {kind}: {description}", flush=True)
            hf_s, hf_tokens = run_transformers(directory, prompts, output_lens)
            ml_s, ml_tokens = run_molink(directory, prompts, output_lens)
            table = _table(prompts, output_lens, hf_s, hf_tokens, ml_s, ml_tokens)
            print(table, flush=True)
            sections.append(f"## Workload `{kind}`: {description}\n\n{table}\n")
    if not args.quick:
        _write(args, num_requests, sections)


def _write(args, num_requests: int, sections: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python -m " + " ".join(shlex.quote(a) for a in ["benchmarks.engine_throughput",
                                                               *sys.argv[1:]])
    header = (f"# Engine throughput: molink vs transformers\n\nCommand: `{command}`\n\n"
              f"Machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}. "
              f"Model: random Llama hidden={args.hidden} layers={args.layers} "
              f"vocab={args.vocab}, fp32. {num_requests} requests per workload, all submitted "
              "at once, greedy, EOS ignored. Both systems run side by side in one process, one "
              "after the other, on the same model files.\n\n"
              "The bound: with every request present from the start, neither system can do "
              "fewer forward steps than the longest output; a static batch also computes every "
              "request until the longest is done and pads every prompt to the longest.\n\n")
    (RESULTS / "engine_throughput.md").write_text(header + "\n".join(sections))
    print(f"wrote {RESULTS / 'engine_throughput.md'}")


def _table(prompts, output_lens, hf_s, hf_tokens, ml_s, ml_tokens) -> str:
    useful = sum(output_lens)
    computed_hf = len(prompts) * max(output_lens)
    agree = sum(a == b for a, b in zip(ml_tokens, hf_tokens))
    lines = ["| system | wall s | useful tokens/s | computed tokens/s |",
             "|---|---:|---:|---:|",
             (f"| transformers generate (static batch) | {hf_s:.2f} | {useful / hf_s:.1f} | "
             f"{computed_hf / hf_s:.1f} |"),
             (f"| molink LLM (continuous batching) | {ml_s:.2f} | {useful / ml_s:.1f} | "
             f"{useful / ml_s:.1f} |"),
             "",
             (f"**Speed-up (useful tokens/s, same run): {hf_s / ml_s:.2f}x**; useful tokens "
             f"{useful}, tokens a static batch computes {computed_hf} "
             f"({computed_hf / useful:.2f}x)."),
             "",
             (f"Greedy outputs identical to transformers for {agree}/{len(prompts)} requests "
             "(left padding in the static batch can flip near-ties).")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
