"""The markdown tables of the results file."""

from __future__ import annotations

from benchmarks.gguf_smollm2.common import MAX_TOKENS, PROMPTS, SPEED_PROMPTS

AGREEMENT_INTRO = ("Leading generated tokens equal to transformers' (in brackets: how many "
                   "MoLink generated; both stop at `<|im_end|>`), and the max |logit difference| "
                   "over every prompt position.")
AGREEMENT_HEAD = ("| prompt | HF tokens | agree: MoLink 1 process | agree: MoLink 3 stages "
                  "| identical sequences | max logit diff 1 process | max logit diff 3 stages |")
SPEED_INTRO = (f"Batch of {len(SPEED_PROMPTS)} chat prompts x {MAX_TOKENS} tokens (ignore_eos), "
               "greedy, one fresh process per row, 2 threads, rows run in this order (4-bit, "
               "dense, 4-bit, dense, then the memory-only rows). Decode tokens/s = "
               f"batch x ({MAX_TOKENS} - 1) / (time for {MAX_TOKENS} tokens - time for 1 token).")
SPEED_HEAD = ("| weights | compute dtype | decode tok/s | resident weights MiB "
              "| RSS before load MiB | RSS after load MiB | KV cache MiB | load s |")


def agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def tables(answers, hf, single, staged, diff_single, diff_staged, speed) -> str:
    lines = ["## 1. Chat over 3 stages (HTTP API, openai client, greedy, max_tokens 64)", "",
             "| prompt | answer |", "|---|---|"]
    for q, a in zip(PROMPTS, answers):
        lines.append(f"| {q} | {a.replace(chr(10), ' ').replace('|', '/')} |")
    lines += ["", "## 2. Greedy agreement with `transformers` (same GGUF, float32)", "",
              AGREEMENT_INTRO, "", AGREEMENT_HEAD, "|---|---:|---:|---:|---|---:|---:|"]
    for i, q in enumerate(PROMPTS):
        same = "yes" if list(hf[i]) == list(single[i]) == list(staged[i]) else "no"
        lines.append(f"| {q} | {len(hf[i])} | {agreement(hf[i], single[i])} ({len(single[i])}) "
                     f"| {agreement(hf[i], staged[i])} ({len(staged[i])}) | {same} "
                     f"| {diff_single[i]:.2e} | {diff_staged[i]:.2e} |")
    lines += ["", "## 3. Decode speed and weight memory in MoLink: 4-bit GGUF vs bf16 weights", "",
              SPEED_INTRO, "", SPEED_HEAD, "|---|---|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + speed_rows(speed))


def speed_rows(speed) -> list[str]:
    (q4, dense, q4b, denseb), q4_bf16, dense_bf16 = speed[:4], speed[4], speed[5]
    lines = []
    for name, row in (("4-bit GGUF (QuantLinear)", q4), ("bf16 safetensors", dense),
                      ("4-bit GGUF (QuantLinear), round 2", q4b),
                      ("bf16 safetensors, round 2", denseb),
                      ("4-bit GGUF (QuantLinear)", q4_bf16), ("bf16 safetensors", dense_bf16)):
        tok_s = "-" if row["decode_tok_s"] != row["decode_tok_s"] else f"{row['decode_tok_s']:.1f}"
        lines.append(f"| {name} | {row['dtype']} | {tok_s} | {mib(row['weights'])} | "
                     f"{mib(row['rss_before'])} | {mib(row['rss_after'])} | {mib(row['kv'])} | "
                     f"{row['load_s']:.1f} |")
    growth_q4 = q4_bf16["rss_after"] - q4_bf16["rss_before"]
    growth_dense = dense_bf16["rss_after"] - dense_bf16["rss_before"]
    lines += ["",
              ("- decode speed, 4-bit / dense (both float32 compute): "
               f"**{q4['decode_tok_s'] / dense['decode_tok_s']:.2f}x** (round 1), "
               f"**{q4b['decode_tok_s'] / denseb['decode_tok_s']:.2f}x** (round 2)"),
              ("- resident weights, 4-bit / bf16 (both loaded with dtype bfloat16): "
               f"**{q4_bf16['weights'] / dense_bf16['weights']:.2f}x**"),
              ("- RSS growth on load, 4-bit / bf16 (dtype bfloat16): "
               f"**{growth_q4 / max(1, growth_dense):.2f}x**")]
    return lines
