"""Models by name: a stage fetches from the Hub only the shards holding its layers.

The Hub is a local stand-in (``tests/model/fake_hub.py``, an HTTP server speaking the
Hub's file API) reached by the real ``huggingface_hub.hf_hub_download``; the cache is an
empty folder per test. In-process tests point huggingface_hub's settings (read from the
environment once, at import) at them; ``test_environment_variables_are_honoured`` sets the
real environment variables in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from molink.model import hub
from molink.model.loader import load_model
from tests.model.fake_hub import FakeHub
from tests.model_factory import build_model

CPU = torch.device("cpu")
REPO = "molink-test/tiny-llama"
GATED = "molink-test/gated-llama"
TOKEN = "hf_test_token"
NUM_LAYERS = 6
SHARDS = ["model-embed.safetensors", *(f"model-layer-{i}.safetensors" for i in range(NUM_LAYERS)),
          "model-head.safetensors"]
ALWAYS = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja"}  # what the tiny model has of the config and tokenizer files


def _shard_of(name: str) -> str:
    if name.startswith("model.layers."):
        return f"model-layer-{name.split('.')[2]}.safetensors"
    return "model-embed.safetensors" if "embed_tokens" in name else "model-head.safetensors"


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    """A 6-layer tiny Llama re-saved as one shard per layer, one for the embedding and one
    for the final norm and LM head, with its ``model.safetensors.index.json``."""
    directory = build_model("llama", tmp_path_factory.mktemp("sharded"),
                            num_hidden_layers=NUM_LAYERS)
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    weight_map = {name: _shard_of(name) for name in tensors}
    for shard in SHARDS:
        save_file({n: t for n, t in tensors.items() if weight_map[n] == shard},
                  directory / shard, metadata={"format": "pt"})
    (directory / hub.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.fixture
def fake_hub(sharded_dir, tmp_path, monkeypatch):
    """The stand-in Hub serving REPO and GATED, and an empty cache; yields (hub, cache)."""
    from huggingface_hub import constants

    fake = FakeHub()
    fake.add_repo(REPO, sharded_dir)
    fake.add_repo(GATED, sharded_dir, token=TOKEN)
    endpoint, server = fake.start()
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    yield fake, cache
    server.shutdown()
    server.server_close()


def _snapshot_files(directory: str) -> set[str]:
    return {p.name for p in Path(directory).iterdir()}


def test_a_stage_downloads_only_the_shards_of_its_layers(fake_hub, sharded_dir):
    fake, cache = fake_hub
    directory = hub.resolve_model(REPO, 2, 4)

    commit = fake.repos[REPO].commit
    assert Path(directory) == cache / "models--molink-test--tiny-llama" / "snapshots" / commit
    stage_shards = {"model-layer-2.safetensors", "model-layer-3.safetensors"}
    assert fake.downloaded(REPO) - ALWAYS == {hub.INDEX_FILE, *stage_shards}
    assert {f for f in _snapshot_files(directory) if f.endswith(".safetensors")} == stage_shards
    assert ALWAYS <= _snapshot_files(directory)
    assert "merges.txt" not in _snapshot_files(directory)  # the repo has none: skipped

    from_hub, _ = load_model(directory, 2, 4, "float32", CPU)
    local, _ = load_model(str(sharded_dir), 2, 4, "float32", CPU)
    hub_params, local_params = dict(from_hub.named_parameters()), dict(local.named_parameters())
    assert hub_params.keys() == local_params.keys()
    for name, param in hub_params.items():
        assert torch.equal(param, local_params[name]), name


def test_llm_by_name_generates_as_the_local_directory(fake_hub, sharded_dir):
    from molink import LLM, SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0)
    by_name = LLM(model=REPO, dtype="float32", device="cpu", num_kv_blocks=16)
    local = LLM(model=str(sharded_dir), dtype="float32", device="cpu", num_kv_blocks=16)
    prompt = "hello world"
    assert (by_name.generate(prompt, params)[0].outputs[0].token_ids
            == local.generate(prompt, params)[0].outputs[0].token_ids)
    fake, _ = fake_hub
    assert set(SHARDS) <= fake.downloaded(REPO)  # all layers: every shard


def test_first_and_last_stages_add_the_embedding_and_the_head(fake_hub):
    fake, _ = fake_hub
    first = hub.resolve_model(REPO, 0, 1)
    assert {f for f in _snapshot_files(first) if f.endswith(".safetensors")} == {
        "model-embed.safetensors", "model-layer-0.safetensors"}
    fake.requests.clear()
    last = hub.resolve_model(REPO, 5)  # to the last layer
    assert last == first  # the same snapshot folder gathers every stage's files
    assert fake.downloaded(REPO) - ALWAYS == {"model-layer-5.safetensors",
                                              "model-head.safetensors"}


def test_a_head_without_layers_downloads_no_weights(fake_hub):
    from molink.coordinator.tokenizer import load_tokenizer

    fake, _ = fake_hub
    directory = hub.resolve_model(REPO, weights=False)
    assert fake.downloaded(REPO) == ALWAYS
    assert load_tokenizer(directory).encode("hello world")


def test_offline_mode_uses_the_warm_cache_without_the_hub(fake_hub, monkeypatch):
    from huggingface_hub import constants

    fake, _ = fake_hub
    directory = hub.resolve_model(REPO, 2, 4)
    fake.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.resolve_model(REPO, 2, 4) == directory
    assert hub.resolve_model(REPO, 3, 4) == directory
    assert fake.requests == []  # not one request reached the Hub
    emulated = hub.HubRepo.parse("molink-test/emulated-only")
    fake.add_repo(emulated.repo_id, Path(directory))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.resolve_model(emulated.repo_id, weights=False)  # config and tokenizer cached only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=rf"{hub.INDEX_FILE} is not in the cache and offline"):
        hub.resolve_model(emulated.repo_id, 0, 1)
    with pytest.raises(ValueError, match=r"model-layer-1.safetensors is not in the cache and "
                                         r"offline mode \(HF_HUB_OFFLINE\) is on"):
        hub.resolve_model(REPO, 1, 2)


def test_a_cached_model_is_used_when_the_hub_is_down(fake_hub, monkeypatch):
    from huggingface_hub import constants

    directory = hub.resolve_model(REPO, 2, 4)
    down = "http://127.0.0.1:9"  # the discard port: connection refused
    monkeypatch.setattr(constants, "ENDPOINT", down)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        down + "/{repo_id}/resolve/{revision}/{filename}")
    started = time.monotonic()
    assert hub.resolve_model(REPO, 2, 4) == directory
    assert time.monotonic() - started < 10  # no retries with backoff for absent files


def test_an_unreachable_hub_without_the_file_cached_is_a_one_line_error():
    """What huggingface_hub raises, after its retries, when the Hub cannot be reached and
    the file is not cached (made here: the retries take half a minute)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = hub.HubRepo(REPO, fetching="model-layer-0.safetensors")
    error = LocalEntryNotFoundError("An error happened while trying to locate the file...\n")
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert hub._message(error, repo) == (
        "model 'molink-test/tiny-llama': the Hub could not be reached and the cache lacks "
        "model-layer-0.safetensors ([Errno 111] Connection refused)")


def test_an_unsharded_checkpoint_is_fetched_whole(fake_hub, tiny_model_dir, tmp_path):
    fake, _ = fake_hub
    fake.add_repo("molink-test/one-file", tiny_model_dir("llama"))
    directory = hub.resolve_model("molink-test/one-file", 1, 2)
    assert "model.safetensors" in fake.downloaded("molink-test/one-file")
    load_model(directory, 1, 2, "float32", CPU)  # raises if the snapshot lacks a tensor
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_bytes((Path(directory) / "config.json").read_bytes())
    fake.add_repo("molink-test/bin-only", no_weights)
    with pytest.raises(ValueError, match=r"'molink-test/bin-only' has no model.safetensors on "
                                         r"the Hub \(MoLink reads model.safetensors or "):
        hub.resolve_model("molink-test/bin-only", 0, 1)


def test_a_gated_repo_needs_a_token_and_the_token_is_sent(fake_hub, monkeypatch):
    fake, _ = fake_hub
    with pytest.raises(ValueError, match=r"gated on the Hub: it needs a token: set HF_TOKEN "
                                         r"or run `huggingface-cli login`"):
        hub.resolve_model(GATED, 2, 4)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    directory = hub.resolve_model(GATED, 2, 4)
    assert "model-layer-2.safetensors" in _snapshot_files(directory)
    assert "model-layer-2.safetensors" in fake.downloaded(GATED)


def test_a_revision_pins_the_commit(fake_hub):
    fake, _ = fake_hub
    commit = fake.repos[REPO].commit
    directory = hub.resolve_model(f"{REPO}@{commit}", 2, 3)
    assert Path(directory).name == commit
    with pytest.raises(ValueError, match="revision 'v9' of 'molink-test/tiny-llama' not found"):
        hub.resolve_model(f"{REPO}@v9", 2, 3)


@pytest.mark.parametrize(("name", "message"), [
    ("molink-test/missing", ("'molink-test/missing' is not a directory and not found on the "
                             "Hub; if it is private, it needs a token")),
    ("/no/such/model", "model '/no/such/model' is not a directory, nor a Hugging Face Hub"),
    ("no-such-dir", "is not a directory, nor a Hugging Face Hub repo id"),
    ("org/name@", "is not a directory, nor a Hugging Face Hub repo id"),
    ("org/bad--name", "is not a directory, nor a Hugging Face Hub repo id"),
])
def test_bad_names_are_one_line_errors(fake_hub, name, message):
    with pytest.raises(ValueError, match=message) as info:
        hub.resolve_model(name, 0, 1)
    assert "\n" not in str(info.value)


def test_layers_outside_the_model_download_no_weights(fake_hub):
    fake, _ = fake_hub
    with pytest.raises(ValueError, match=r"layers 4:9 are outside the model's 6 layers"):
        hub.resolve_model(REPO, 4, 9)
    assert not any(f.endswith(".safetensors") for f in fake.downloaded(REPO))


def test_a_local_path_is_returned_unchanged(sharded_dir, tmp_path):
    assert hub.resolve_model(str(sharded_dir), 2, 4) == str(sharded_dir)
    missing_config = str(tmp_path)  # exists: the loader, not the Hub, reports what lacks
    assert hub.resolve_model(missing_config) == missing_config


def test_environment_variables_are_honoured(fake_hub, tmp_path):
    """HF_HOME and HF_ENDPOINT, then HF_HUB_OFFLINE, in fresh processes (huggingface_hub
    reads them at import)."""
    fake, _ = fake_hub
    endpoint = huggingface_endpoint()
    home = tmp_path / "home"
    env = {**os.environ, "HF_HOME": str(home), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"}
    for inherited in ("HF_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        env.pop(inherited, None)
    code = f"from molink.model.hub import resolve_model; print(resolve_model({REPO!r}, 3, 4))"
    online = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    directory = Path(online.stdout.strip().splitlines()[-1])
    assert directory.parent.parent == home / "hub" / "models--molink-test--tiny-llama"
    assert "model-layer-3.safetensors" in fake.downloaded(REPO)
    fake.requests.clear()
    offline = subprocess.run([sys.executable, "-c", code], env={**env, "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=120, check=True)
    assert Path(offline.stdout.strip().splitlines()[-1]) == directory
    assert fake.requests == []


def huggingface_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _weights(fake: FakeHub) -> set[str]:
    return {f for f in fake.downloaded(REPO) if f.endswith(".safetensors")}


def test_join_fetches_its_layers_and_an_emulated_stage_no_weights(fake_hub):
    from molink.entrypoints.join import stage_model

    fake, _ = fake_hub
    directory, start, end = stage_model(Namespace(model=REPO, layers="2:", emulate_device="x"))
    assert (start, end) == (2, NUM_LAYERS) and _weights(fake) == set()
    assert (Path(directory) / "config.json").is_file()
    assert stage_model(Namespace(model=REPO, layers="2:4", emulate_device=None)) == (
        directory, 2, 4)
    assert _weights(fake) == {"model-layer-2.safetensors", "model-layer-3.safetensors"}
    with pytest.raises(ValueError, match="--layers 4:9 is outside the model's 6 layers"):
        stage_model(Namespace(model=REPO, layers="4:9", emulate_device=None))


def test_serve_fetches_the_head_layers_only(fake_hub):
    from molink.entrypoints.serve import head_model, served_name

    fake, _ = fake_hub
    directory, layers = head_model(Namespace(model=REPO, layers="none"))
    assert layers is None and _weights(fake) == set()
    assert head_model(Namespace(model=REPO, layers="0:2")) == (directory, (0, 2))
    assert _weights(fake) == {"model-embed.safetensors", "model-layer-0.safetensors",
                              "model-layer-1.safetensors"}
    with pytest.raises(ValueError, match="--layers for the head must start at 0"):
        head_model(Namespace(model=REPO, layers="2:4"))
    assert _weights(fake) == {"model-embed.safetensors", "model-layer-0.safetensors",
                              "model-layer-1.safetensors"}
    assert served_name(REPO) == served_name(f"{REPO}@v1") == REPO
    assert served_name(directory) == Path(directory).name


def test_a_packed_awq_or_gptq_linear_counts_as_its_layers_tensors(tiny_model_dir):
    """Shards are chosen by tensor name: a quantized linear is stored as qweight / qzeros /
    scales (/ g_idx) instead of weight, and those are what its stage must download."""
    from molink.model.hub import needed_tensor_names

    directory = str(tiny_model_dir("llama"))
    dense = needed_tensor_names(directory, 0, 4, frozenset(_all_names(directory)))
    packed = set()
    for name in dense:
        if ".layers." in name and name.endswith("_proj.weight"):
            base = name.removesuffix("weight")
            packed.update(base + suffix for suffix in ("qweight", "qzeros", "scales", "g_idx"))
        else:
            packed.add(name)
    wanted = needed_tensor_names(directory, 1, 2, frozenset(packed))
    assert {n for n in wanted if n.endswith(".qweight")} == {
        n for n in packed if n.startswith("model.layers.1.") and n.endswith(".qweight")}
    assert "model.layers.1.self_attn.q_proj.g_idx" in wanted
    assert not any(n.startswith(("model.layers.0.", "model.layers.2.")) for n in wanted)


def _all_names(directory: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(f"{directory}/model.safetensors", framework="pt") as handle:
        return list(handle.keys())
