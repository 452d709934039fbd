"""Models by name: a Hugging Face Hub repo fetched into the local cache, a stage's part only.

``resolve_model("org/name[@revision]", start, end)`` downloads with
``huggingface_hub.hf_hub_download`` (which honours ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ``HF_TOKEN`` and ``HF_ENDPOINT`` by itself, and shows its own progress
bars on a terminal): config.json, generation_config.json and the tokenizer files when the
repo has them, the safetensors index, then only the shards holding a tensor that layers
``[start, end)`` read. Every file lands in one snapshot folder of the cache (the first
file pins the commit), and that folder is returned: the loader reads it like any model
directory, and finds in it exactly the shards its stage needs. A local path is returned
unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from molink.model.awq_gptq import PACKED_TENSORS
from molink.model.loader import load_config, stored_name

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
# Fetched when present: what the head's tokenizer, chat template and EOS ids read.
OPTIONAL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                  "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                  "chat_template.json")
TOKEN_HINT = "needs a token: set HF_TOKEN or run `huggingface-cli login`"


def resolve_model(name_or_path: str, start_layer: int = 0, end_layer: int | None = None, *,
                  weights: bool = True) -> str:
    """A local model directory for ``name_or_path``, holding what layers
    ``[start_layer, end_layer)`` need (``end_layer`` None: to the last layer).

    ``weights=False``: config and tokenizer files only (a head computing no layers, an
    emulated stage). Raises ValueError (one line) for a name that is neither a local path
    nor a repo id, a repo not found or gated, and a file neither cached nor reachable.
    """
    if not isinstance(name_or_path, str) or Path(name_or_path).expanduser().exists():
        return name_or_path  # a local path (or not a name at all: ModelConfig says so)
    repo = HubRepo.parse(name_or_path)
    with _clear_errors(repo):
        repo.fetch(CONFIG_FILE)
        for filename in OPTIONAL_FILES:
            repo.fetch_optional(filename)
        if weights:
            for shard in _needed_shards(repo, start_layer, end_layer):
                repo.fetch(shard)
    return str(repo.snapshot)


def is_repo_id(name: str) -> bool:
    """``org/name`` or ``org/name@revision`` as the Hub spells repo ids."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, revision = name.partition("@")
    if repo_id.count("/") != 1 or (at and not revision):
        return False
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


@dataclass
class HubRepo:
    """One repo at one revision; the commit is pinned by the first file fetched, so that
    every later file comes from the same commit and lands in the same snapshot folder."""

    repo_id: str
    revision: str = "main"
    snapshot: Path | None = None  # the cache's snapshots/<commit> folder, once pinned
    fetching: str = ""  # the file being fetched (for error messages)

    @classmethod
    def parse(cls, name: str) -> HubRepo:
        if not is_repo_id(name):
            raise ValueError(
                f"model {name!r} is not a directory, nor a Hugging Face Hub repo id "
                "(org/name or org/name@revision)")
        repo_id, _, revision = name.partition("@")
        return cls(repo_id, revision or "main")

    def __str__(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"

    def fetch(self, filename: str) -> Path:
        """The file's path in the snapshot folder, downloaded unless cached."""
        from huggingface_hub import hf_hub_download

        self.fetching = filename
        revision = self.revision if self.snapshot is None else self.snapshot.name
        cached = self.snapshot is not None and (self.snapshot / filename).is_file()
        path = Path(hf_hub_download(self.repo_id, filename, revision=revision))
        logger.info("%s: %s%s", self, filename, " (cached)" if cached else "")
        if self.snapshot is None:  # snapshots/<commit>/<filename>
            self.snapshot = path.parents[len(Path(filename).parts) - 1]
        return path

    def fetch_optional(self, filename: str, *, need_answer: bool = False) -> Path | None:
        """The file, or None when the repo has no such file (or, offline, it is not cached:
        an optional file is not worth failing for; ``need_answer``: then it is an error).

        Once the commit is pinned, the cache answers first: it also remembers which files
        the commit lacks, so a warm cache asks the Hub nothing (a Hub that cannot be
        reached would otherwise be retried, with backoff, for every absent file)."""
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError

        if self.snapshot is not None:
            cached = try_to_load_from_cache(self.repo_id, filename, revision=self.snapshot.name)
            if isinstance(cached, str):
                return Path(cached)
            if cached is not None:  # huggingface_hub's "known not to exist" marker
                return None
        absent = RemoteEntryNotFoundError if need_answer else EntryNotFoundError
        try:
            return self.fetch(filename)
        except absent:
            return None


def _needed_shards(repo: HubRepo, start_layer: int, end_layer: int | None) -> list[str]:
    """The safetensors files holding a tensor the layer range reads."""
    index = repo.fetch_optional(INDEX_FILE, need_answer=True)  # offline: not a guess
    if index is None:
        return [SINGLE_WEIGHTS_FILE]
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    stored = needed_tensor_names(str(repo.snapshot), start_layer, end_layer, frozenset(weight_map))
    shards = sorted({weight_map[name] for name in stored})
    logger.info("%s: layers %s:%s read %d of %d shards", repo, start_layer,
                "" if end_layer is None else end_layer, len(shards),
                len(set(weight_map.values())))
    return shards


def needed_tensor_names(model_dir: str, start_layer: int, end_layer: int | None,
                        stored_names: frozenset[str]) -> set[str]:
    """Which of the checkpoint's ``stored_names`` the model for the layer range reads: the
    model is built on the meta device (no memory) and asked, parameter by parameter, as
    the loader asks it. Names the checkpoint lacks are left to the loader to report."""
    loaded = load_config(model_dir)
    num_layers = loaded.arch.num_layers
    end_layer = num_layers if end_layer is None else end_layer
    if not 0 <= start_layer < end_layer <= num_layers:
        raise ValueError(f"layers {start_layer}:{end_layer} are outside the model's "
                         f"{num_layers} layers (0:{num_layers})")
    with torch.device("meta"):
        model = loaded.model_class(loaded.arch, start_layer, end_layer)
    select_layout = getattr(model, "select_checkpoint_layout", None)
    if select_layout is not None:  # models whose tensors come in several layouts (MoE experts)
        select_layout(stored_names)
    wanted = {source for name, _ in model.named_parameters()
              for source in model.checkpoint_names(name)}
    names = set()
    for name in wanted:
        if (key := stored_name(name, stored_names)) is not None:
            names.add(key)
        elif name.endswith(".weight"):  # AWQ / GPTQ: the linear is stored packed
            names.update(key for suffix in PACKED_TENSORS if (key := stored_name(
                name.removesuffix("weight") + suffix, stored_names)) is not None)
    return names


@contextlib.contextmanager
def _clear_errors(repo: HubRepo):
    """huggingface_hub's errors (several lines each) as one-line ValueErrors."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        yield
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        raise ValueError(_message(exc, repo)) from None


def _message(exc: Exception, repo: HubRepo) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"model {str(repo)!r}"
    if isinstance(exc, GatedRepoError):
        return f"{name} is gated on the Hub: it {TOKEN_HINT} (and its licence accepted)"
    if isinstance(exc, RepositoryNotFoundError):
        private = "" if _status(exc) == 404 else f"; if it is private, it {TOKEN_HINT}"
        return f"{name} is not a directory and not found on the Hub{private}"
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {repo.revision!r} of {repo.repo_id!r} not found on the Hub"
    if isinstance(exc, RemoteEntryNotFoundError):
        weights = (f" (MoLink reads {SINGLE_WEIGHTS_FILE} or {INDEX_FILE} and its shards)"
                   if repo.fetching == SINGLE_WEIGHTS_FILE else "")
        return f"{name} has no {repo.fetching} on the Hub{weights}"
    cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) else exc
    if isinstance(cause, OfflineModeIsEnabled):
        return f"{name}: {repo.fetching} is not in the cache and offline mode (HF_HUB_OFFLINE) is on"
    if _status(cause) in (401, 403):
        return f"{name} {TOKEN_HINT}"
    if isinstance(exc, LocalEntryNotFoundError):
        return (f"{name}: the Hub could not be reached and the cache lacks {repo.fetching} "
                f"({_first_line(cause or exc)})")
    return f"{name}: {_first_line(exc)}"


def _status(exc: BaseException | None) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
