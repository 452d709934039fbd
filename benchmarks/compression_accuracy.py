"""How much each wire compression of the activations between stages changes the output.

For two models — the bundled trained model (``molink/assets/default_model``) and a
random-weight Llama (hidden 1024, 12 layers) — split into 2 and 3 in-process stages, with
every hop compressed as ``none``, ``float16``, ``bfloat16`` or ``int8``:

* greedy agreement with the uncompressed one-stage run (16 prompts x 48 tokens, EOS
  ignored): the fraction of generated positions identical up to each request's first
  differing token, and the fraction of requests identical throughout;
* teacher-forced logit error: the same prompts, prefilled in one batch through the same
  split, compared with the one-stage logits on identical inputs (so a divergence in
  generation cannot inflate it): the max absolute error of the prompts' last-position
  logits, the same relative to the largest reference logit of that position, and the
  fraction of all prompt positions whose arg-max token is unchanged;
* at the hops themselves: the relative RMS error the compression adds to the activations
  (``||x' - x|| / ||x||``, worst hop), and the bytes per token per hop it puts on the wire.

All runs are float32 on CPU, so the uncompressed rows must show exact agreement: they are
the control.

    python -m benchmarks.compression_accuracy            # writes benchmarks/results/
    python -m benchmarks.compression_accuracy --quick    # smaller, prints only
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.random_llama import build_model
from molink import SamplingParams
from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.llm_engine import LLMEngine
from molink.entrypoints.cli import DEFAULT_MODEL_DIR
from molink.messages import WIRE_COMPRESSIONS, BatchEntry
from molink.runtime.step_inputs import build_step_inputs
from molink.runtime.wire_tensor import from_raw, to_raw

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 16

# Prose in the style the bundled model was trained on (the CPython documentation).
TEXT_PROMPTS = [
    "The list data type has some more methods. Here are all of the methods of list objects:",
    "A dictionary maps keys to values. Keys must be",
    "The for statement in Python differs a bit from what you may be used to in C",
    "If you need to iterate over a sequence of numbers, the built-in function",
    "Exceptions are raised when",
    "The module search path is",
    "Strings can be concatenated with the + operator, and repeated with",
    "A class definition creates a new namespace, and",
    "The with statement allows objects like files to be used in a way that",
    "Functions are defined with the def keyword, followed by",
    "The garbage collector",
    "To read a file, open it with",
    "Generators are a simple and powerful tool for creating iterators. They are written like",
    "The import system",
    "Unicode strings are",
    "The return value of the function is",
]


@dataclass
class Row:
    model: str
    num_stages: int
    compression: str
    prefix_agreement: float  # generated positions equal up to the first difference
    requests_identical: float
    max_abs_logit_error: float
    max_rel_logit_error: float  # max |error| / max |reference logit|, per prompt
    prompt_top1_agreement: float
    hop_rel_rms_error: float  # ||x' - x|| / ||x|| of the activations, worst hop
    bytes_per_token: float  # per hop


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        random_dir = build_model(Path(tmp), args.hidden, args.layers, args.vocab)
        models = [("default_model (trained)", DEFAULT_MODEL_DIR, None),
                  (f"random Llama h{args.hidden} L{args.layers}", random_dir, args.vocab)]
        for name, directory, vocab in models:
            model_rows, note = measure_model(name, directory, vocab, args)
            rows += model_rows
            notes.append(note)
    text = render(rows, notes, args, time.perf_counter() - start)
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "compression_accuracy.md").write_text(text)
        print(f"wrote {RESULTS / 'compression_accuracy.md'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.output_len, args.hidden, args.layers = 4, 8, 256, 6
    return args


# ---- one model --------------------------------------------------------------------------------

def measure_model(name: str, directory: Path, vocab: int | None, args) -> tuple[list[Row], str]:
    """Rows for every (split, compression) of one model, and a note on its logit margins."""
    reference = make_engine(directory, None, "none", args)
    prompts = make_prompts(reference, vocab, args.prompts)
    ref_tokens = greedy(reference, prompts, args.output_len)
    ref_logits, _ = prompt_logits(reference, prompts)
    notes = [margin_note(ref_logits)]
    del reference
    print(f"{name}: reference (1 stage) done", flush=True)
    rows = []
    num_layers = layer_count(directory, args)
    for num_stages in (2, 3):
        for compression in WIRE_COMPRESSIONS:
            tick = time.perf_counter()
            engine = make_engine(directory, split(num_layers, num_stages), compression, args)
            tokens = greedy(engine, prompts, args.output_len)
            logits, hops = prompt_logits(engine, prompts)
            rows.append(compare(name, num_stages, compression, ref_tokens, tokens, ref_logits,
                                logits, prompts, hops))
            if (num_stages, compression) == (2, "none"):
                notes.append(crest_note(hops.activations))
            print(f"{name}: {num_stages} stages, {compression:>8}: "
                  f"{time.perf_counter() - tick:.1f} s", flush=True)
    return rows, f"{name}: " + "; ".join(notes) + "."


def layer_count(directory: Path, args) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory).num_hidden_layers


def split(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_layers / num_stages) for i in range(num_stages + 1)]
    return list(itertools.pairwise(bounds))


def make_engine(directory: Path, stage_layers, compression: str, args) -> LLMEngine:
    blocks_per_request = -(-(64 + args.output_len) // BLOCK_SIZE)  # prompts are <= 64 tokens
    return LLMEngine(ModelConfig(model=str(directory), dtype="float32", device="cpu",
                                 max_model_len=blocks_per_request * BLOCK_SIZE),
                     CacheConfig(block_size=BLOCK_SIZE,
                                 num_blocks=args.prompts * blocks_per_request),
                     SchedulerConfig(max_num_seqs=args.prompts), stage_layers,
                     wire_compression=compression)


def make_prompts(engine: LLMEngine, vocab: int | None, num_prompts: int) -> list[list[int]]:
    """Real text for the trained model; random ids (8 to 32 of them) for the random one."""
    if vocab is None:
        return [engine.tokenizer.encode(text) for text in TEXT_PROMPTS[:num_prompts]]
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 33, (num_prompts,), generator=gen).tolist()
    return [torch.randint(6, vocab, (n,), generator=gen).tolist() for n in lengths]


def greedy(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [engine.add_request(None, prompt, params) for prompt in prompts]
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)
    return [finished[rid] for rid in ids]


@dataclass
class Hops:
    """What crossed the hops of one prefill."""

    bytes_per_token: float = 0.0  # per hop
    rel_rms_error: float = 0.0  # worst hop
    activations: torch.Tensor | None = None  # [T, hidden] sent over the first hop


@torch.inference_mode()
def prompt_logits(engine: LLMEngine, prompts: list[list[int]]) -> tuple[torch.Tensor, Hops]:
    """Logits of every prompt position ([T, vocab]), all prompts prefilled in one step
    through the engine's stages with its wire compression on each hop."""
    names = [str(i) for i in range(len(prompts))]
    batch = [BatchEntry(name, 0, len(p), True) for name, p in zip(names, prompts)]
    blocks_each = -(-max(len(p) for p in prompts) // BLOCK_SIZE)
    block_ids = {name: list(range(i * blocks_each, (i + 1) * blocks_each))
                 for i, name in enumerate(names)}
    token_ids = dict(zip(names, prompts))
    hidden, wire_bytes, hops = None, 0, Hops()
    for index, executor in enumerate(engine.executors):
        if index:
            sent = hidden
            raw = to_raw(sent, engine.wire_compression)
            wire_bytes += len(raw.data) + len(raw.row_scales)
            hidden = from_raw(raw, executor.device, dtype=executor.dtype)
            error = ((hidden.float() - sent.float()).norm() / sent.float().norm()).item()
            hops.rel_rms_error = max(hops.rel_rms_error, error)
            if hops.activations is None:
                hops.activations = sent
        inputs = build_step_inputs(batch, token_ids, block_ids, BLOCK_SIZE, executor.device,
                                   with_input_ids=executor.is_first)
        hidden = executor.model(inputs.positions, inputs.meta, input_ids=inputs.input_ids,
                                hidden_states=hidden)  # [T, hidden]
    logits = engine.executors[-1].model.compute_logits(hidden).float()  # [T, vocab]
    num_hops = len(engine.executors) - 1
    if num_hops:
        hops.bytes_per_token = wire_bytes / num_hops / hidden.shape[0]
    return logits, hops


# ---- comparison and report ------------------------------------------------------------------

def compare(name, num_stages, compression, ref_tokens, tokens, ref_logits, logits, prompts,
            hops: Hops) -> Row:
    agreed = sum(prefix_length(a, b) for a, b in zip(ref_tokens, tokens))
    total = sum(len(a) for a in ref_tokens)
    last = last_rows(prompts)
    error = (logits[last] - ref_logits[last]).abs()  # [num_prompts, vocab]
    scale = ref_logits[last].abs().amax(dim=1)  # [num_prompts]
    return Row(
        model=name, num_stages=num_stages, compression=compression,
        prefix_agreement=agreed / total,
        requests_identical=sum(a == b for a, b in zip(ref_tokens, tokens)) / len(ref_tokens),
        max_abs_logit_error=error.max().item(),
        max_rel_logit_error=(error.amax(dim=1) / scale).max().item(),
        prompt_top1_agreement=(logits.argmax(1) == ref_logits.argmax(1)).float().mean().item(),
        hop_rel_rms_error=hops.rel_rms_error, bytes_per_token=hops.bytes_per_token)


def prefix_length(a: list[int], b: list[int]) -> int:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))


def last_rows(prompts: list[list[int]]) -> list[int]:
    ends, total = [], 0
    for prompt in prompts:
        total += len(prompt)
        ends.append(total - 1)
    return ends


def margin_note(ref_logits: torch.Tensor) -> str:
    """How far apart the top two logits are: small gaps make greedy decoding fragile."""
    top2 = ref_logits.topk(2, dim=1).values  # [T, 2]
    gaps = top2[:, 0] - top2[:, 1]
    spread = ref_logits.std(dim=1)
    return (f"over all {len(gaps)} prompt positions, the gap between the top two logits has "
            f"median {gaps.median().item():.3f} and 10th percentile "
            f"{gaps.quantile(0.1).item():.4f} (logits: median standard deviation "
            f"{spread.median().item():.3f})")


def crest_note(activations: torch.Tensor) -> str:
    """max|x| / rms(x) per token: int8's step is max|x| / 127, so this sets its error."""
    x = activations.float()  # [T, hidden]
    crest = x.abs().amax(dim=1) / x.pow(2).mean(dim=1).sqrt()
    return (f"activations at the middle hop have max|x| / rms(x) per token of median "
            f"{crest.median().item():.1f} (max {crest.max().item():.1f})")


def render(rows: list[Row], notes: list[str], args, seconds: float) -> str:
    command = "python -m " + " ".join(shlex.quote(a) for a in ["benchmarks.compression_accuracy",
                                                               *sys.argv[1:]])
    lines = [
        "# Wire compression of activations: accuracy", "",
        f"Command: `{command}`", "",
        (f"float32 weights and compute on CPU, {args.threads} torch thread(s), in-process "
         f"stages (`LLMEngine(stage_layers=..., wire_compression=...)`), every hop "
         f"compressed. Reference: the same model as one stage, uncompressed. Greedy: "
         f"{args.prompts} prompts x {args.output_len} tokens, EOS ignored. Logit errors: the "
         f"prompts' last-position logits, teacher-forced (identical inputs); relative error = "
         f"max |error| / max |reference logit| of that position; top-1 = fraction of all "
         f"prompt positions whose arg-max is unchanged. Bytes: per token per hop. Hop rel RMS "
         f"err: ||x' - x|| / ||x|| of the activations crossing a hop (worst hop). "
         f"Total time {seconds:.0f} s."), "",
        ("| model | stages | compression | bytes/token | hop rel RMS err "
         "| greedy prefix agreement | requests identical | max abs logit err "
         "| max rel logit err | prompt top-1 |"),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.model} | {r.num_stages} | {r.compression} | {r.bytes_per_token:.0f} "
                     f"| {r.hop_rel_rms_error:.1e} | {r.prefix_agreement:.3f} "
                     f"| {r.requests_identical:.3f} "
                     f"| {r.max_abs_logit_error:.2e} | {r.max_rel_logit_error:.2e} "
                     f"| {r.prompt_top1_agreement:.3f} |")
    lines += ["", "Context:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
