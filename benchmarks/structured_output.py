"""Structured output: time per token of a grammar's token mask, xgrammar vs llguidance.

    python -m benchmarks.structured_output [--tokenizer DIR_OR_JSON ...] [--repeats N]

For each tokenizer (default: the bundled model's) and each library that is installed, a
JSON schema is compiled once, then a valid instance of it is fed token by token, as the
last stage does while decoding: per token, fill the request's bitmask row (what the sampler
applies to the logits) and advance the matcher with the token. Reported: compile time, and
the time per token of mask + advance (mean, p50, p99), over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 6},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "role", "address"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace of the analytical engine", "age": 36,
            "email": "ada@engine.com", "tags": ["math", "poetry", "computing", "notes"],
            "role": "admin", "address": {"city": "London", "zip": "W1 4AA"}}
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "molink" / "assets" / "default_model"


def _hf_tokenizer(path: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path.endswith(".json"):
        return PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|endoftext|>")
    return AutoTokenizer.from_pretrained(path)


class Llguidance:
    name = "llguidance"

    def __init__(self, hf, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.lib = llguidance
        self.fill = llguidance.torch.fill_next_token_bitmask
        self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size)

    def compile(self, schema: dict):
        grammar = self.lib.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        return self.lib.LLMatcher(self.tokenizer, grammar)

    def matcher(self, compiled):
        return compiled.deep_copy()

    def step(self, matcher, bitmask: torch.Tensor, token: int) -> None:
        self.fill(matcher, bitmask, 0)
        assert matcher.consume_token(token), matcher.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, hf, vocab_size: int) -> None:
        import xgrammar

        self.lib = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        return self.lib.GrammarMatcher(compiled)

    def step(self, matcher, bitmask: torch.Tensor, token: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)
        assert matcher.accept_token(token)


def _run(lib, tokens: list[int], vocab_size: int, repeats: int) -> dict:
    start = time.perf_counter()
    compiled = lib.compile(SCHEMA)
    compile_s = time.perf_counter() - start
    bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    per_token: list[float] = []
    for _ in range(repeats):
        matcher = lib.matcher(compiled)
        for token in tokens:
            begin = time.perf_counter()
            lib.step(matcher, bitmask, token)
            per_token.append(time.perf_counter() - begin)
    per_token.sort()
    return {"compile_ms": compile_s * 1e3, "mean_us": statistics.fmean(per_token) * 1e6,
            "p50_us": per_token[len(per_token) // 2] * 1e6,
            "p99_us": per_token[int(len(per_token) * 0.99)] * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", action="append", default=None,
                        help="a tokenizer directory or tokenizer.json (repeatable; default: the "
                             "bundled model's)")
    parser.add_argument("--repeats", type=int, default=20, help="runs per case (default: 20)")
    args = parser.parse_args()
    print("| tokenizer | vocab | library | compile ms | mean us/token | p50 | p99 | tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.tokenizer or [str(DEFAULT_TOKENIZER)]:
        hf = _hf_tokenizer(path)
        vocab_size = len(hf)
        # json.dumps' separators (", ", ": "): xgrammar's grammar without free whitespace
        # requires them, llguidance's default accepts them.
        tokens = hf.encode(json.dumps(INSTANCE), add_special_tokens=False)
        for cls in (Llguidance, Xgrammar):
            try:
                lib = cls(hf, vocab_size)
            except ImportError:
                continue
            row = _run(lib, tokens, vocab_size, args.repeats)
            print(f"| {Path(path).name} | {vocab_size} | {cls.name} | {row['compile_ms']:.1f} | "
                  f"{row['mean_us']:.1f} | {row['p50_us']:.1f} | {row['p99_us']:.1f} | "
                  f"{len(tokens)} |")


if __name__ == "__main__":
    main()
