"""Train the small default model bundled with MoLink (``molink/assets/default_model``).

Everything it needs ships with CPython and the MoLink dependencies: the corpus is the
English documentation text that comes with Python itself (``pydoc_data.topics``, the
reference-manual topics behind ``help()``) plus the docstrings of a fixed, sorted list of
standard-library modules. No download, no ``datasets``, no ``Trainer``: a byte-level BPE
tokenizer trained with ``tokenizers`` and a small ``LlamaForCausalLM`` trained by a plain
PyTorch loop on the CPU.

Reproduce the shipped model (CPU only, one thread, about 25 minutes)::

    python scripts/train_default_model.py

Useful options::

    --bench 20         time 20 training steps, print tokens/s and the projected time, save nothing
    --steps N          number of optimizer steps (default: the shipped value)
    --out DIR          where to write the model (default: molink/assets/default_model)
    --corpus-only      build the corpus, print statistics and a sample, then stop

Runs are deterministic for a given Python version (the corpus depends on it), torch
version and thread count: fixed seeds, ``torch.use_deterministic_algorithms(True)``,
``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "molink" / "assets" / "default_model"

SEED = 1234
# One thread: on the 2-core machine that built the shipped model (shared with other work)
# a single thread trained 2-3x faster than two. The thread count is part of what makes a
# run bit-for-bit reproducible.
THREADS = 1

# --- tokenizer -------------------------------------------------------------------------
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, UNK, PAD, IM_START, IM_END)  # ids 0..5
VOCAB_SIZE = 4096
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# --- model and training ----------------------------------------------------------------
MODEL = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
SEQ_LEN = 256
BATCH_SIZE = 8
STEPS = 800  # from --bench and a first full run (~1.8 s/step): <= ~25 minutes
LR = 2e-3
MIN_LR_RATIO = 0.1
WARMUP = 50
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
DOC_MIN_CHARS = 600
DOC_MAX_PARAGRAPHS = 8
HELD_OUT_EVERY = 20  # ~5% of documents, picked by a hash of their text

# --- generation settings recommended for the demo --------------------------------------
GEN = dict(do_sample=True, temperature=0.8, top_p=0.95, repetition_penalty=1.2,
           max_new_tokens=64)
SAMPLE_PROMPTS = ("The function", "A list is", "In Python,")

# --- corpus ----------------------------------------------------------------------------
# Standard-library modules whose docstrings join the corpus: pure documentation text,
# importable everywhere without side effects. Sorted; only objects defined in the module
# itself are visited, so the result depends only on the Python version.
DOC_MODULES = sorted(set([
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "builtins", "bz2", "calendar",
    "cmd", "code", "codecs", "collections", "collections.abc", "colorsys", "compileall",
    "concurrent.futures", "configparser", "contextlib", "contextvars", "copy", "copyreg",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email",
    "email.message", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "gc", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip",
    "hashlib", "heapq", "hmac", "html", "html.parser", "http", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib",
    "importlib.abc", "importlib.machinery", "importlib.metadata", "importlib.resources",
    "importlib.util", "inspect", "io", "ipaddress", "itertools", "json", "keyword",
    "linecache", "locale", "logging", "logging.config", "logging.handlers", "lzma",
    "mailbox", "marshal", "math", "mimetypes", "modulefinder", "multiprocessing",
    "netrc", "numbers", "operator", "optparse", "os", "os.path", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random",
    "re", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "signal", "site", "smtplib", "socket", "socketserver", "sqlite3",
    "ssl", "stat", "statistics", "string", "stringprep", "struct", "subprocess",
    "symtable", "sys", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "token", "tokenize", "trace", "traceback",
    "tracemalloc", "types", "typing", "unicodedata", "unittest", "unittest.mock",
    "urllib.error", "urllib.parse", "urllib.request", "urllib.robotparser", "uuid",
    "warnings", "wave", "weakref", "webbrowser", "wsgiref.handlers", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax", "xmlrpc.client", "zipapp", "zipfile", "zipimport",
    "zlib", "zoneinfo",
    "_collections_abc", "_pydecimal", "_pyio", "_strptime", "asyncio.base_events",
    "asyncio.events", "asyncio.futures", "asyncio.locks", "asyncio.queues",
    "asyncio.streams", "asyncio.tasks", "asyncio.transports", "bdb", "codeop",
    "concurrent.futures.process", "concurrent.futures.thread", "ctypes", "dbm",
    "email.charset", "email.header", "email.headerregistry", "email.mime.text",
    "email.parser", "email.policy", "ftplib", "json.decoder", "json.encoder",
    "multiprocessing.connection", "multiprocessing.managers", "multiprocessing.pool",
    "multiprocessing.process", "multiprocessing.queues", "multiprocessing.shared_memory",
    "multiprocessing.synchronize", "ntpath", "posixpath", "pty", "tomllib", "tty",
    "unittest.case", "unittest.loader", "unittest.result", "unittest.runner",
    "unittest.suite", "venv", "xml.dom", "xml.etree.ElementPath", "xml.sax.handler",
    "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.server",
]))

_UNDERLINE = re.compile(r"^\s*([*=\-~^\"#+])\1{2,}\s*$")
_FOOTNOTE = re.compile(r"^\s*\[\d+\]")
_CODEY = re.compile(r"(>>>|::=|\.\.\. |->|\+--|\|\s*$|^\s*[|+]|[{}\\@$]|\w\(.*,.*\)|==|!=|\+=|\w=\w)")


def _clean_paragraph(lines: list[str]) -> str | None:
    """One paragraph as one line of prose, or None when it is code, a table or a heading."""
    if not lines:
        return None
    if lines[0].startswith("   ") or lines[0].lstrip().startswith((">>>", "-[", "[")):
        return None  # code block, footnote heading, footnote
    kept = [line for line in lines if not _UNDERLINE.match(line)]
    if len(kept) < len(lines):
        return None  # a heading (its underline was there)
    if any(_CODEY.search(line) for line in lines):
        return None
    text = " ".join(line.strip() for line in lines)
    text = re.sub(r"\*\*(\w[^*]*?)\*\*", r"\1", text)  # **strong** -> strong
    text = re.sub(r"(?<![*\w])\*(\w[^*]*?)\*(?![*\w])", r"\1", text)  # *emphasis* -> emphasis
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r'"\1"', text)  # :func:`name` -> "name"
    text = re.sub(r"``([^`]+)``|`([^`]+)`", lambda m: f'"{m.group(1) or m.group(2)}"', text)
    text = re.sub(r"\s+", " ", text).strip()
    words = text.split()
    if len(words) < 6:
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    if letters / len(text) < 0.8:
        return None
    if not text[-1] in ".:!?)\"”":
        return None  # cut-off or list-like fragment
    return text


def _paragraphs(text: str) -> list[list[str]]:
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return paragraphs


def _prose(text: str) -> list[str]:
    """The prose paragraphs of ``text``, each cleaned to one line."""
    return [c for c in map(_clean_paragraph, _paragraphs(text)) if c is not None]


def _docstrings(module_name: str) -> list[str]:
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - a module missing on this build is simply skipped
            return []
    found = [inspect.getdoc(module)]
    for name, obj in sorted(vars(module).items()):
        owner = getattr(obj, "__module__", None)
        if not isinstance(owner, str) or owner.split(".")[0] != module_name.split(".")[0]:
            continue  # re-exported from elsewhere in the stdlib (visited there, if listed)
        if inspect.isclass(obj):
            found.append(inspect.getdoc(obj))
            for attr, member in sorted(vars(obj).items()):
                if callable(member) or isinstance(member, (property, staticmethod, classmethod)):
                    found.append(getattr(member, "__doc__", None))
        elif inspect.isroutine(obj):
            found.append(inspect.getdoc(obj))
    return [inspect.cleandoc(doc) for doc in found if isinstance(doc, str) and doc.strip()]


def build_corpus() -> list[str]:
    """Documents (strings) in a fixed order.

    Each source (one reference topic, or the docstrings of one module) contributes its
    prose paragraphs, de-duplicated across the whole corpus; consecutive paragraphs of a
    source are grouped into documents of at least DOC_MIN_CHARS characters (or
    DOC_MAX_PARAGRAPHS paragraphs), so the model learns to write on for a while before
    ``</s>`` rather than to stop after every one-line docstring.
    """
    from pydoc_data.topics import topics

    sources: list[list[str]] = [_prose(topics[key]) for key in sorted(topics)]
    for module_name in DOC_MODULES:
        sources.append([p for doc in _docstrings(module_name) for p in _prose(doc)])
    seen: set[str] = set()
    docs: list[str] = []
    for paragraphs in sources:
        run: list[str] = []
        for paragraph in paragraphs:
            if paragraph in seen:
                continue
            seen.add(paragraph)
            run.append(paragraph)
            if sum(map(len, run)) >= DOC_MIN_CHARS or len(run) == DOC_MAX_PARAGRAPHS:
                docs.append("\n".join(run))
                run = []
        if run:
            docs.append("\n".join(run))
    return docs


def is_held_out(doc: str) -> bool:
    return int(hashlib.sha256(doc.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


# --- tokenizer -------------------------------------------------------------------------
def train_tokenizer(docs: list[str], directory: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, token
    # Encoding a prompt prepends <s>, as the model saw at the start of every document.
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, 0)]),
    ])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL["max_position_embeddings"],
        add_bos_token=True,
        add_eos_token=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(directory))
    # transformers 5 names the class "TokenizersBackend" and writes the template to
    # chat_template.jinja; older releases (MoLink supports >= 4.45) know neither, so write
    # the portable form: PreTrainedTokenizerFast with the template inside the config.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE,
                  add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    loaded = AutoTokenizer.from_pretrained(str(directory))
    ids = loaded.encode("A list is")
    assert ids[0] == 0 and 0 not in ids[1:], ids
    assert loaded.chat_template == CHAT_TEMPLATE
    assert len(loaded) == VOCAB_SIZE, len(loaded)
    return loaded


def encode_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """``<s> doc </s> <s> doc </s> ...`` as one flat tensor of token ids."""
    ids: list[int] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    batch = [enc.ids for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)]
    for doc_ids in batch:
        ids.append(bos)
        ids.extend(doc_ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --- training --------------------------------------------------------------------------
def make_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=0, eos_token_id=1, pad_token_id=3,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
        initializer_range=0.02,
        **MODEL,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def lr_at(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(stream: torch.Tensor, steps: int):
    """Random windows of SEQ_LEN + 1 tokens, from a seeded generator."""
    gen = torch.Generator().manual_seed(SEED)
    high = len(stream) - SEQ_LEN - 1
    for _ in range(steps):
        starts = torch.randint(0, high, (BATCH_SIZE,), generator=gen)
        yield torch.stack([stream[s:s + SEQ_LEN + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, stream: torch.Tensor) -> float:
    """Mean next-token cross-entropy over non-overlapping SEQ_LEN windows of ``stream``."""
    model.eval()
    total, count = 0.0, 0
    n = (len(stream) - 1) // SEQ_LEN
    windows = [stream[i * SEQ_LEN:(i + 1) * SEQ_LEN + 1] for i in range(n)]
    rest = stream[n * SEQ_LEN:]
    for i in range(0, len(windows), 16):
        chunk = torch.stack(windows[i:i + 16])
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), chunk[:, 1:].reshape(-1), reduction="sum")
        total, count = total + loss.item(), count + chunk[:, 1:].numel()
    if len(rest) > 1:
        logits = model(input_ids=rest[None, :-1]).logits
        total += torch.nn.functional.cross_entropy(
            logits[0].float(), rest[1:], reduction="sum").item()
        count += len(rest) - 1
    model.train()
    return total / count


def train(model, stream: torch.Tensor, steps: int, held_out: torch.Tensor | None,
          log_every: int = 20) -> float:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    start = time.perf_counter()
    smoothed = None
    for step, batch in enumerate(batches(stream, steps)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            tok_s = (step + 1) * BATCH_SIZE * SEQ_LEN / elapsed
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(f"step {step + 1}/{steps}  loss {smoothed:.3f}  lr {lr_at(step, steps):.2e}  "
                  f"{tok_s:.0f} tok/s  elapsed {elapsed / 60:.1f} min  eta {eta / 60:.1f} min",
                  flush=True)
        if held_out is not None and (step + 1) % 250 == 0 and step + 1 < steps:
            print(f"  held-out loss {evaluate(model, held_out):.3f}", flush=True)
    return time.perf_counter() - start


# --- outputs ---------------------------------------------------------------------------
def generate_samples(model_dir: Path) -> list[tuple[str, str, str]]:
    """(prompt, mode, text) from the saved float16 checkpoint, run in float32 on the CPU."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        for mode in ("greedy", "sampled"):
            torch.manual_seed(SEED)
            if mode == "greedy":
                kwargs = dict(do_sample=False, max_new_tokens=GEN["max_new_tokens"])
            else:
                kwargs = dict(GEN)
            with torch.no_grad():
                gen = model.generate(**ids, **kwargs, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(gen[0], skip_special_tokens=True)
            out.append((prompt, mode, text))
    return out


def psf_copyright_years() -> str:
    """The years of the PSF copyright notice in this Python's LICENSE.txt, e.g. 2001-2023."""
    import sysconfig

    try:
        text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    except OSError:
        return "2001-present"
    match = re.search(r"Copyright \(c\) ([\d,\s]+?)\s*Python Software Foundation", text)
    if not match:
        return "2001-present"
    years = [int(y) for y in re.findall(r"\d{4}", match.group(1))]
    return f"{min(years)}-{max(years)}"


def write_model_card(out: Path, info: dict) -> None:
    samples = "\n".join(
        f"* `{prompt}` ({'greedy' if mode == 'greedy' else 'temperature 0.8, top_p 0.95, repetition_penalty 1.2'}):\n\n"
        f"  > {text.replace(chr(10), ' ')}\n"
        for prompt, mode, text in info["samples"])
    card = f"""# MoLink default model

A tiny Llama-architecture language model (`LlamaForCausalLM`, {info['params'] / 1e6:.1f}M
parameters) bundled with MoLink so that `molink demo` works offline, with no download.
It writes English-like prose in the style of the Python documentation. It is a
demonstration of the serving engine, not a useful assistant: it knows little, makes
things up, and has no instruction tuning (the ChatML `chat_template` is there so the chat
code path can be exercised).

## Files

| file | contents |
|---|---|
| `config.json` | `LlamaConfig`: hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads ({MODEL['num_key_value_heads']} KV heads), MLP {MODEL['intermediate_size']}, vocab {VOCAB_SIZE}, tied embeddings, context {MODEL['max_position_embeddings']} |
| `model.safetensors` | weights in float16, {info['weights_bytes'] / 1e6:.1f} MB |
| `generation_config.json` | bos/eos/pad ids and the recommended sampling settings |
| `tokenizer.json`, `tokenizer_config.json` | byte-level BPE, {VOCAB_SIZE} tokens; special tokens `<s>` (0, bos), `</s>` (1, eos), `<unk>` (2), `<pad>` (3), `<|im_start|>` (4), `<|im_end|>` (5); encoding a prompt prepends `<s>` |

Parameters: {info['params']:,} (embedding tied with the output layer).

## Training

Exact command (from the repository root, CPU only, deterministic for a given Python
version, torch version and thread count):

    python scripts/train_default_model.py

* Python {info['python']} ({info['python_impl']}), torch {torch.__version__}, transformers
  {info['transformers']}, tokenizers {info['tokenizers']}; torch.set_num_threads({THREADS}).
* {info['steps']} AdamW steps (betas 0.9/0.95, weight decay {WEIGHT_DECAY}, peak lr {LR},
  {WARMUP} warm-up steps, cosine decay to {MIN_LR_RATIO:g}x), batch {BATCH_SIZE} x
  {SEQ_LEN} tokens ({info['steps'] * BATCH_SIZE * SEQ_LEN / 1e6:.1f}M tokens seen,
  about {info['epochs']:.0f} passes over the training split), gradient clipping {GRAD_CLIP}.
* Training time: {info['train_seconds'] / 60:.1f} minutes wall clock, {info['tok_per_s']:.0f} tokens/s
  ({info['device']}; the machine was shared with other work, so the time varies from run
  to run while the result does not).

### Corpus

English prose from the documentation that ships with CPython {info['python']}, read
offline:

* `pydoc_data.topics.topics` -- the Language Reference and library topics behind
  `help()`, generated from the Python documentation;
* docstrings of {len(DOC_MODULES)} standard-library modules (a fixed, sorted list in the
  script; the module, and the classes, methods and functions of its package found in its
  namespace), collected with `inspect.getdoc`.

Light cleaning: paragraphs are joined into single lines and reST markup is removed;
headings, tables, footnotes, grammar rules, indented code blocks, interactive examples
and other code-heavy or fragmentary paragraphs are dropped; paragraphs are de-duplicated;
consecutive paragraphs of one topic or module form a document of at least
{DOC_MIN_CHARS} characters (or {DOC_MAX_PARAGRAPHS} paragraphs), written as
`<s> document </s>`. {info['docs']:,} documents,
{info['chars'] / 1e6:.2f}M characters. A deterministic ~5% of documents (SHA-256 of the
text mod {HELD_OUT_EVERY} == 0) is held out: {info['train_tokens']:,} training tokens,
{info['held_out_tokens']:,} held-out tokens.

### Evaluation

Held-out mean token cross-entropy (float32 weights before the float16 export):
**{info['held_out_loss']:.3f} nats/token, perplexity {math.exp(info['held_out_loss']):.1f}**;
with the saved float16 weights: {info['held_out_loss_fp16']:.3f} (perplexity
{math.exp(info['held_out_loss_fp16']):.1f}).

## Samples

From the saved checkpoint, `max_new_tokens={GEN['max_new_tokens']}`, seed {SEED}:

{samples}
Recommended settings for the demo: temperature 0.8, top_p 0.95, repetition_penalty 1.2,
64 new tokens (greedy decoding of a model this small tends to loop).

## Licence and credit

The training text is taken from Python's own documentation and source docstrings:
Copyright (c) {info['psf_years']} Python Software Foundation; All Rights Reserved. Python and its
documentation are distributed under the PSF License Agreement (Python Software Foundation
License Version 2); since Python 3.8.6, examples, recipes and other code in the
documentation are dual licensed under the PSF License Version 2 and the Zero-Clause BSD
license (see "History and License" in the Python documentation, or the `LICENSE` file of
CPython). The model weights and tokenizer are part of MoLink and are distributed under
MoLink's Apache-2.0 licence.
"""
    (out / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--bench", type=int, default=0, metavar="N",
                        help="time N steps, print the projected run time and stop")
    parser.add_argument("--corpus-only", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    t0 = time.perf_counter()
    docs = build_corpus()
    train_docs = [d for d in docs if not is_held_out(d)]
    held_docs = [d for d in docs if is_held_out(d)]
    chars = sum(len(d) for d in docs)
    print(f"Python {platform.python_version()}: {len(docs)} documents, {chars / 1e6:.2f}M chars "
          f"({len(held_docs)} held out) in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.corpus_only:
        import random

        for doc in random.Random(SEED).sample(docs, 12):
            print("---\n" + doc)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "README.md"):
        (args.out / stale).unlink(missing_ok=True)
    tokenizer = train_tokenizer(train_docs, args.out)
    train_stream = encode_stream(tokenizer, train_docs)
    held_stream = encode_stream(tokenizer, held_docs)
    print(f"tokens: train {len(train_stream):,}, held-out {len(held_stream):,} "
          f"({chars / (len(train_stream) + len(held_stream)):.2f} chars/token)", flush=True)

    model = make_model()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters", flush=True)

    if args.bench:
        seconds = train(model, train_stream, args.bench, None, log_every=5)
        per_step = seconds / args.bench
        print(f"bench: {per_step:.2f} s/step; {STEPS} steps ~ {per_step * STEPS / 60:.1f} min; "
              f"25 min ~ {int(25 * 60 / per_step)} steps")
        return 0

    print(f"initial held-out loss {evaluate(model, held_stream):.3f}", flush=True)
    seconds = train(model, train_stream, args.steps, held_stream)
    held_out_loss = evaluate(model, held_stream)
    print(f"held-out loss {held_out_loss:.4f}, perplexity {math.exp(held_out_loss):.2f}; "
          f"trained in {seconds / 60:.1f} min", flush=True)

    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=3, **GEN)
    model.to(torch.float16).save_pretrained(str(args.out), safe_serialization=True)
    # Older transformers releases read "torch_dtype" and a top-level "rope_theta".
    config_path = args.out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("torch_dtype", config.get("dtype", "float16"))
    config.setdefault("rope_theta", MODEL["rope_theta"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.to(torch.float32)
    (args.out / "model.safetensors").chmod(0o644)  # safetensors writes 0600
    fp16 = LlamaForCausalLM.from_pretrained(str(args.out), dtype=torch.float32)
    held_out_loss_fp16 = evaluate(fp16, held_stream)
    print(f"held-out loss of the saved float16 weights {held_out_loss_fp16:.4f}", flush=True)

    samples = generate_samples(args.out)
    for prompt, mode, text in samples:
        print(f"[{mode}] {text!r}")

    import tokenizers
    import transformers

    write_model_card(args.out, dict(
        params=params,
        weights_bytes=(args.out / "model.safetensors").stat().st_size,
        python=platform.python_version(), python_impl=platform.python_implementation(),
        transformers=transformers.__version__, tokenizers=tokenizers.__version__,
        steps=args.steps, epochs=args.steps * BATCH_SIZE * SEQ_LEN / len(train_stream),
        train_seconds=seconds, tok_per_s=args.steps * BATCH_SIZE * SEQ_LEN / seconds,
        device=f"{platform.machine()} CPU, {THREADS} thread{'s' * (THREADS > 1)}",
        psf_years=psf_copyright_years(),
        docs=len(docs), chars=chars, train_tokens=len(train_stream),
        held_out_tokens=len(held_stream), held_out_loss=held_out_loss,
        held_out_loss_fp16=held_out_loss_fp16, samples=samples,
    ))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
