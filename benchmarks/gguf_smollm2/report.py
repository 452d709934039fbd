"""The markdown tables of the results file."""

from __future__ import annotations

from benchmarks.gguf_smollm2.common import MAX_TOKENS, PROMPTS, SPEED_PROMPTS

AGREEMENT_INTRO = ("Leading generated tokens equal to transformers' (in brackets: how many "
                   "MoLink generated; both stop at `<|im_end|>`), and the max |logit difference| "
                   "over every prompt position.")
AGREEMENT_HEAD = ("| prompt | HF tokens | agree: MoLink 1 process | agree: MoLink 3 stages "
                  "| identical sequences | max logit diff 1 process | max logit diff 3 stages "
                  "| agree: 3 stages in bfloat16 |")
SPEED_INTRO = (f"Batch of {len(SPEED_PROMPTS)} chat prompts x {MAX_TOKENS} tokens (ignore_eos), "
               "greedy, one fresh process per row, 2 threads, rows run in the order shown (two "
               "rounds of: 4-bit and dense in bfloat16, then both in float32). Decode tokens/s "
               f"= batch x ({MAX_TOKENS} - 1) / (time for {MAX_TOKENS} tokens - time for 1 "
               "token).")
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


def tables(chats, hf, single, diff_single, diff_staged, speed) -> str:
    answers32, answers16 = chats["float32"][1], chats["bfloat16"][1]
    staged, staged16 = chats["float32"][2], chats["bfloat16"][2]
    lines = ["## 1. Chat over 3 stages (HTTP API, openai client, greedy, max_tokens 64)", "",
             "| prompt | answer (float32) | answer (bfloat16, integer kernels) |",
             "|---|---|---|"]
    for q, a, b in zip(PROMPTS, answers32, answers16):
        lines.append(f"| {q} | {_cell(a)} | {_cell(b)} |")
    lines += ["", "## 2. Greedy agreement with `transformers` (same GGUF, float32)", "",
              AGREEMENT_INTRO, "", AGREEMENT_HEAD, "|---|---:|---:|---:|---|---:|---:|---:|"]
    for i, q in enumerate(PROMPTS):
        same = "yes" if list(hf[i]) == list(single[i]) == list(staged[i]) else "no"
        lines.append(f"| {q} | {len(hf[i])} | {agreement(hf[i], single[i])} ({len(single[i])}) "
                     f"| {agreement(hf[i], staged[i])} ({len(staged[i])}) | {same} "
                     f"| {diff_single[i]:.2e} | {diff_staged[i]:.2e} "
                     f"| {agreement(hf[i], staged16[i])} ({len(staged16[i])}) |")
    lines += ["", "## 3. Decode speed and weight memory in MoLink: 4-bit GGUF vs bf16 weights", "",
              SPEED_INTRO, "", SPEED_HEAD, "|---|---|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + speed_rows(speed))


def _cell(text: str) -> str:
    return text.replace(chr(10), " ").replace("|", "/")


def speed_rows(speed) -> list[str]:
    """``speed``: two rounds of (4-bit, dense) in bfloat16, then in float32."""
    names = {("bfloat16", 0): "4-bit GGUF (integer kernels)", ("bfloat16", 1): "bf16 safetensors",
             ("float32", 0): "4-bit GGUF (QuantLinear, dequantized each step)",
             ("float32", 1): "bf16 safetensors (upcast)"}
    lines = []
    for i, row in enumerate(speed):
        tok_s = "-" if row["decode_tok_s"] != row["decode_tok_s"] else f"{row['decode_tok_s']:.1f}"
        name = names[row["dtype"], i % 2] + (", round 2" if i >= 4 else "")
        lines.append(f"| {name} | {row['dtype']} | {tok_s} | {mib(row['weights'])} | "
                     f"{mib(row['rss_before'])} | {mib(row['rss_after'])} | {mib(row['kv'])} | "
                     f"{row['load_s']:.1f} |")
    rounds = [speed[:4], speed[4:]]  # each: q4 bf16, dense bf16, q4 fp32, dense fp32

    def ratio(a: int, b: int) -> str:
        return " / ".join(f"{r[a]['decode_tok_s'] / r[b]['decode_tok_s']:.2f}x" for r in rounds)

    q4, dense = speed[0], speed[1]
    growth_q4 = q4["rss_after"] - q4["rss_before"]
    growth_dense = dense["rss_after"] - dense["rss_before"]
    lines += ["",
              ("- decode speed, 4-bit on integer kernels / bf16 dense (both bfloat16), round "
               f"1 / 2: **{ratio(0, 1)}**"),
              ("- decode speed, 4-bit bfloat16 on integer kernels / 4-bit float32 dequantized "
               f"each step (`QuantLinear`), round 1 / 2: **{ratio(0, 2)}**"),
              f"- decode speed, 4-bit / dense in float32, round 1 / 2: **{ratio(2, 3)}**",
              ("- resident weights, 4-bit / bf16 (both bfloat16): "
               f"**{q4['weights'] / dense['weights']:.2f}x**"),
              ("- RSS growth on load, 4-bit / bf16 (bfloat16): "
               f"**{growth_q4 / max(1, growth_dense):.2f}x**")]
    return lines
