"""Stage-aware loading: a layer range reads its own tensors and nothing else."""

from __future__ import annotations

import json

import pytest
import torch

from molink.model import loader
from tests.model_factory import build_model

CPU = torch.device("cpu")


class _RecordingSafeOpen:
    """Wraps ``safetensors.safe_open`` to record every file opened and tensor read."""

    def __init__(self, real):
        self.real = real
        self.files: list[str] = []
        self.tensors: list[str] = []

    def __call__(self, filename, *args, **kwargs):
        self.files.append(str(filename))
        handle = self.real(filename, *args, **kwargs)
        recorder = self

        class Handle:
            def __enter__(self):
                self.inner = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, name):
                recorder.tensors.append(name)
                return self.inner.get_tensor(name)

        return Handle()


def _expected_names(num_layers: int, start: int, end: int, tied: bool) -> set[str]:
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight",
                 "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight"]
    names = {f"model.layers.{i}.{suffix}" for i in range(start, end) for suffix in per_layer}
    if start == 0:
        names.add("model.embed_tokens.weight")
    if end == num_layers:
        names.add("model.norm.weight")
        names.add("model.embed_tokens.weight" if tied else "lm_head.weight")
    return names


@pytest.mark.parametrize("start,end", [(0, 1), (1, 3), (3, 4), (0, 4)])
def test_layer_range_reads_only_its_own_tensors(tiny_model_dir, monkeypatch, start, end):
    directory = tiny_model_dir("llama")
    recorder = _RecordingSafeOpen(loader.safe_open)
    monkeypatch.setattr(loader, "safe_open", recorder)
    model, _ = loader.load_model(str(directory), start, end, "float32", CPU)
    assert set(recorder.tensors) == _expected_names(4, start, end, tied=False)
    assert len(recorder.tensors) == len(set(recorder.tensors))  # each read once
    assert sorted(model.model.layers.keys()) == [str(i) for i in range(start, end)]


def test_sharded_checkpoint_opens_only_needed_shards(tmp_path, monkeypatch):
    directory = tmp_path / "sharded"
    build_model("llama", directory)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory)
    for file in directory.glob("*.safetensors"):
        file.unlink()
    hf.save_pretrained(directory, max_shard_size="40KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    recorder = _RecordingSafeOpen(loader.safe_open)
    monkeypatch.setattr(loader, "safe_open", recorder)
    loader.load_model(str(directory), 1, 2, "float32", CPU)
    expected = _expected_names(4, 1, 2, tied=False)
    assert set(recorder.tensors) == expected
    needed_shards = {str(directory / index["weight_map"][name]) for name in expected}
    assert set(recorder.files) == needed_shards


def test_tied_embeddings_last_stage_reads_the_embedding(tiny_model_dir, monkeypatch):
    directory = tiny_model_dir("qwen2")  # tie_word_embeddings=True
    recorder = _RecordingSafeOpen(loader.safe_open)
    monkeypatch.setattr(loader, "safe_open", recorder)
    model, _ = loader.load_model(str(directory), 2, 4, "float32", CPU)
    assert "model.embed_tokens.weight" in recorder.tensors
    assert "lm_head.weight" not in recorder.tensors
    assert not hasattr(model.model, "embed_tokens")  # only the LM head holds it here


@pytest.mark.parametrize("dtype,expected", [("float32", torch.float32),
                                            ("bfloat16", torch.bfloat16),
                                            ("float16", torch.float16),
                                            ("auto", torch.float32)])
def test_dtype_option(tiny_model_dir, dtype, expected):
    model, _ = loader.load_model(str(tiny_model_dir("llama")), 0, 2, dtype, CPU)
    assert {p.dtype for p in model.parameters()} == {expected}


@pytest.mark.parametrize("checkpoint,int4,expected", [
    ("bfloat16", False, torch.bfloat16),
    ("float16", False, torch.bfloat16),  # fp16 on a CPU: bf16's range, same size
    ("float32", False, torch.float32),
    ("float32", True, torch.bfloat16),  # the int4 CPU kernel runs in bf16 only
])
def test_auto_dtype_on_a_cpu(tiny_model_dir, checkpoint, int4, expected):
    import dataclasses

    arch = dataclasses.replace(loader.load_config(str(tiny_model_dir("llama"))).arch,
                               dtype=checkpoint)
    assert loader.resolve_dtype("auto", arch, CPU, int4_weights=int4) == expected
    # Off the CPU, and for an explicit dtype, nothing is second-guessed.
    assert loader.resolve_dtype("auto", arch, torch.device("meta"), int4) == getattr(
        torch, checkpoint)
    assert loader.resolve_dtype("float16", arch, CPU, int4) == torch.float16


@pytest.mark.parametrize("native_bf16", [True, False])
def test_16_bit_linears_compute_prefill_in_float32_on_a_cpu_without_bf16(
        tiny_model_dir, monkeypatch, native_bf16):
    from molink.model.layers import fused16
    from molink.model.layers.cpu_linear import FLOAT32_FROM_TOKENS, CpuLinear

    monkeypatch.setattr(loader, "cpu_lacks_native_bf16", lambda: not native_bf16)
    monkeypatch.setattr(fused16, "kernels", lambda: None)  # the PyTorch path (kernels: below)
    model, _ = loader.load_model(str(tiny_model_dir("llama")), 0, 4, "bfloat16", CPU)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, CpuLinear) != native_bf16 for m in linears)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # weights stay 16-bit
    if native_bf16:
        return
    layer = linears[0]
    torch.manual_seed(0)
    for rows in (1, FLOAT32_FROM_TOKENS - 1, FLOAT32_FROM_TOKENS, 64, 65):
        x = torch.randn(rows, layer.in_features).to(torch.bfloat16)
        # float32 products of the widened weight, in the orientation CpuLinear takes for
        # this many rows (see test_cpu_linear.py), rounded back to bf16
        wide32 = layer.weight.float()
        wide = (wide32 @ x.float().T).T if rows <= 64 else torch.nn.functional.linear(
            x.float(), wide32)
        narrow = torch.nn.functional.linear(x, layer.weight)
        expected = wide.bfloat16() if rows >= FLOAT32_FROM_TOKENS else narrow
        assert torch.equal(layer(x), expected), rows


def test_the_cpu_bf16_check_reads_the_flags_of_this_machine():
    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    if not flags:
        assert loader.cpu_lacks_native_bf16() is False  # unknown: keep the checkpoint's dtype
    else:
        has = bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags.partition(":")[2].split()))
        assert loader.cpu_lacks_native_bf16() is (not has)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_16_bit_models_on_a_cpu_without_bf16_use_the_fused_kernels_and_float32_attention(
        tiny_model_dir, monkeypatch, native_bf16):
    from molink.model.layers import fused16, packed_linear
    from molink.model.layers.attention import PagedAttention
    from molink.model.layers.cpu_linear import TiledCpuLinear
    from molink.model.layers.packed_linear import AmxLinear, PackedLinear

    if fused16.kernels() is None:
        pytest.skip(f"no fused kernels here: {fused16.unsupported_reason()}")
    monkeypatch.setattr(loader, "cpu_lacks_native_bf16", lambda: not native_bf16)
    path = str(tiny_model_dir("llama"))
    model, _ = loader.load_model(path, 0, 4, "bfloat16", CPU)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    attentions = [m for m in model.modules() if isinstance(m, PagedAttention)]
    assert linears and attentions
    assert all(isinstance(m, TiledCpuLinear) != native_bf16 for m in linears)
    # native bf16: weights in AMX tiles where MoLink's AMX kernel runs, else packed for
    # oneDNN where this PyTorch and CPU can
    amx = native_bf16 and packed_linear.amx_kernel() is not None
    packs = native_bf16 and not amx and packed_linear.unsupported_reason() is None
    assert all(isinstance(m, AmxLinear) == amx for m in linears)
    assert all(isinstance(m, PackedLinear) == packs for m in linears)
    assert {m.compute_dtype for m in attentions} == ({None} if native_bf16 else {torch.float32})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # weights stay 16-bit
    # the packed weights (either kind) read back as the checkpoint's
    monkeypatch.setattr(fused16, "kernels", lambda: None)
    monkeypatch.setenv("MOLINK_CPU_KERNELS", "0")
    plain = loader.load_model(path, 0, 4, "bfloat16", CPU)[0]
    assert not any(isinstance(m, (AmxLinear, PackedLinear, TiledCpuLinear))
                   for m in plain.modules())
    packed, plain = model.state_dict(), plain.state_dict()
    assert set(packed) == set(plain)
    assert all(torch.equal(packed[name], plain[name]) for name in plain)


def test_missing_directory_and_config_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        loader.load_config(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="has no config.json"):
        loader.load_config(str(tmp_path))


def test_unknown_architecture_lists_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    with pytest.raises(ValueError, match="not supported; supported: .*LlamaForCausalLM"):
        loader.load_config(str(tmp_path))


def test_layer_range_outside_model_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="outside the model's 0:4"):
        loader.load_model(str(tiny_model_dir("llama")), 2, 9, "float32", CPU)


def test_checkpoint_saved_from_a_bare_base_model_loads(tiny_model_dir, tmp_path):
    """Original GPT-2 / BLOOM files name ``h.0...`` instead of ``transformer.h.0...``."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = tiny_model_dir("llama")
    bare = tmp_path / "bare"
    shutil.copytree(source, bare)
    (bare / "model.safetensors").unlink()
    tensors = load_file(str(source / "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in tensors.items()},
              str(bare / "model.safetensors"))
    original, _ = loader.load_model(str(source), 0, 4, "float32", CPU)
    renamed, _ = loader.load_model(str(bare), 0, 4, "float32", CPU)
    for (name, a), (_, b) in zip(original.named_parameters(), renamed.named_parameters()):
        assert torch.equal(a, b), name
