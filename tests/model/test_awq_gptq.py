"""AWQ and GPTQ checkpoints: linears stay packed, equal the reference dequantization exactly.

Checkpoints are written by ``tests.model.awq_gptq_factory`` (loop-based packers written from
the published formats, independent of the loader's unpacking) from tiny Llama and Qwen2
models (Qwen2: q/k/v biases, tied embeddings), and loaded through ``load_model`` / ``LLM``.
The reference is ``transformers`` loading a plain checkpoint of the reference-dequantized
weights.

Tolerances: every linear's dequantized weight equals the reference bit for bit in float32
(fp16 scales times small integers are exact in float32). Logits are float32 on both sides
from those identical weights, so they differ only by operation order (PyTorch's int4 CPU
kernel accumulates in its own order): ``LOGIT_TOL`` (1e-4) as for every architecture against
``transformers``. Greedy tokens must be identical.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from molink import LLM
from molink.model import loader
from molink.model.layers import int_amx, int_linear
from molink.model.layers.int_linear import IntLinear
from molink.model.loader import load_config, load_model
from tests.model import hf_configs
from tests.model.arch_checks import LOGIT_TOL, greedy_tokens, hf_reference, make_prompts
from tests.model.awq_gptq_factory import LINEARS, Format, write_quantized
from tests.model.gguf_factory import resident_weight_bytes
from tests.model.helpers import load_stages, prompt_logits
from tests.model.test_loader import _RecordingSafeOpen
from tests.model_factory import build_model_from_config

CPU = torch.device("cpu")
THREE_STAGES = [(0, 1), (1, 3), (3, None)]
# name -> (tiny config, format)
MODELS = {
    "llama-awq-g32": (hf_configs.llama_config, Format("awq", group_size=32)),
    "qwen2-awq-g64-skip": (hf_configs.qwen2_config,
                           Format("awq", group_size=64, not_converted=("model.layers.1.mlp",))),
    "llama-gptq-sym-actorder": (hf_configs.llama_config,
                                Format("gptq", sym=True, act_order=True)),
    "qwen2-gptq_v2-actorder": (hf_configs.qwen2_config,
                               Format("gptq", act_order=True, checkpoint_format="gptq_v2")),
    "llama-gptq-rowwise": (hf_configs.llama_config, Format("gptq", group_size=-1)),
    "llama-gptq-8bit": (hf_configs.llama_config,
                        Format("gptq", bits=8, act_order=True, checkpoint_format="gptq_v2")),
}
GREEDY = ["llama-awq-g32", "qwen2-awq-g64-skip", "llama-gptq-sym-actorder",
          "qwen2-gptq_v2-actorder"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    made = {}

    def get(name: str, wide: bool = False):
        key = (name, wide)
        if key not in made:
            config, fmt = MODELS[name]
            sizes = {"hidden_size": 256, "intermediate_size": 512} if wide else {}
            if wide:  # groups of 128, as published checkpoints have
                fmt = dataclasses.replace(fmt, group_size=128)
            root = tmp_path_factory.mktemp(name)
            hf_dir = build_model_from_config(config(**sizes), root / "hf")
            made[key] = write_quantized(hf_dir, root, fmt)
        return made[key]

    return get


def _int_linears(model: nn.Module) -> dict[str, IntLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, IntLinear)}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_linear_equals_the_reference_dequantization_exactly(name, written):
    w = written(name)
    model, _ = load_model(str(w.quantized), 0, None, "float32", CPU)
    linears = _int_linears(model)
    parts_of = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj",
                                                                            "up_proj")}
    covered = []
    for module_name, module in linears.items():
        leaf = module_name.rpartition(".")[2]
        sources = [module_name.replace(leaf, part) for part in parts_of.get(leaf, (leaf,))]
        expected = torch.cat([w.reference[source] for source in sources])
        assert torch.equal(module.weight_as(torch.float32), expected), module_name
        covered += sources
        assert module.qweight0.dtype in (torch.uint8, torch.int8)  # kept packed
    assert sorted(covered) == sorted(w.reference)  # every packed linear, nothing else
    skipped = MODELS[name][1].not_converted
    for entry in skipped:  # modules_to_not_convert: plain linears read from `.weight`
        assert all(not n.startswith(entry) for n in linears)
        assert isinstance(model.get_submodule(f"{entry}.down_proj"), nn.Linear)
    assert len(linears) == 4 * 4 - 2 * len(skipped)  # qkv, o, gate_up, down per layer
    # float32: packed codes dequantized, then a matmul (the int4 kernel is bf16's)
    kinds = {block.kind for m in linears.values() for block in m.blocks}
    assert kinds == ({"nibbles"} if MODELS[name][1].bits == 4 else {"bytes"})


@pytest.mark.parametrize("name", ["llama-awq-g32", "qwen2-gptq_v2-actorder"])
def test_bf16_stages_use_the_int4_kernel_on_the_fallbacks_weights(name, written, monkeypatch):
    """bf16, the CPU serving dtype: an int4 kernel does the matmul (MoLink's AMX kernel on a
    CPU with AMX, PyTorch's elsewhere; act-order as an input permutation), with exactly the
    weight the plain fallback dequantizes; outputs within one bf16 step of the magnitude sum
    (PyTorch's kernel keeps bf16 partial sums)."""
    path = str(written(name).quantized)
    kernel_kind = "groupamx" if int_amx.kernels() is not None else "int4pack"
    kernel_model, _ = load_model(path, 0, None, "bfloat16", CPU)
    monkeypatch.setattr(int_linear, "INT4_KERNEL_DTYPES", ())
    monkeypatch.setattr(int_amx, "kernels", lambda: None)
    plain_model, _ = load_model(path, 0, None, "bfloat16", CPU)
    plain_linears = _int_linears(plain_model)
    gen = torch.Generator().manual_seed(0)
    for module_name, layer in _int_linears(kernel_model).items():
        plain = plain_linears[module_name]
        assert {b.kind for b in layer.blocks} == {kernel_kind}
        assert {b.kind for b in plain.blocks} == {"nibbles"}
        assert any(b.permuted for b in layer.blocks) == MODELS[name][1].act_order
        weight = plain.weight_as(torch.bfloat16)
        assert torch.equal(layer.weight_as(torch.bfloat16), weight), module_name
        x = torch.randn(16, layer.in_features, generator=gen).to(torch.bfloat16)
        bound = 2.0 ** -8 * (x.float().abs() @ weight.float().abs().t())
        assert ((layer(x).float() - x.float() @ weight.float().t()).abs() <= bound).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers_on_the_dequantized_model(name, written):
    w = written(name)
    reference = hf_reference(w.dense)
    whole = load_stages(w.quantized, [(0, None)])
    split = load_stages(w.quantized, THREE_STAGES)
    for prompt in make_prompts(reference.vocab_size, (23, 40)):
        expected = reference.logits(prompt)
        assert (prompt_logits(whole, prompt) - expected).abs().max().item() <= LOGIT_TOL
        chunked = prompt_logits(split, prompt, chunks=[3, 9, len(prompt) - 12])
        assert (chunked - expected).abs().max().item() <= LOGIT_TOL


@pytest.mark.parametrize("name", GREEDY)
def test_greedy_tokens_match_transformers_single_and_three_stages(name, written):
    w = written(name)
    prompts, expected = hf_reference(w.dense).greedy()
    for stage_layers in (None, [(0, 1), (1, 3), (3, 4)]):
        llm = LLM(model=str(w.quantized), dtype="float32", device="cpu", block_size=4,
                  stage_layers=stage_layers)
        assert greedy_tokens(llm, prompts) == expected, stage_layers


@pytest.mark.parametrize("name", ["llama-awq-g32", "llama-gptq-sym-actorder"])
def test_four_bit_stage_holds_at_most_035_of_its_bf16_size(name, written):
    """Measured: bytes of the storages behind a bf16 middle stage's parameters and buffers
    (groups of 128; GPTQ act-order also keeps one input permutation per part)."""
    w = written(name, wide=True)
    model, _ = load_model(str(w.quantized), 1, 3, "bfloat16", CPU)
    linears = _int_linears(model).values()
    bf16_bytes = 2 * sum(m.in_features * m.out_features for m in linears)
    bf16_bytes += 2 * sum(p.numel() for p in model.parameters())  # norms
    resident = resident_weight_bytes(model)
    assert resident <= 0.35 * bf16_bytes, (resident, bf16_bytes, resident / bf16_bytes)


def test_a_stage_reads_only_its_own_tensors(written, monkeypatch):
    w = written("llama-gptq-sym-actorder")
    recorder = _RecordingSafeOpen(loader.safe_open)
    monkeypatch.setattr(loader, "safe_open", recorder)
    load_model(str(w.quantized), 1, 3, "float32", CPU)
    packed = [f"{linear}.{t}" for linear in LINEARS for t in ("qweight", "qzeros", "scales",
                                                              "g_idx")]
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", *packed]
    expected = {f"model.layers.{i}.{suffix}" for i in (1, 2) for suffix in per_layer}
    assert sorted(recorder.tensors) == sorted(expected)


UNSUPPORTED = {
    "bits 3": ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
    "marlin": ({"quant_method": "gptq", "bits": 4, "group_size": 128,
                "checkpoint_format": "marlin"}, "'marlin'"),
    "marlin flag": ({"quant_method": "gptq", "bits": 4, "group_size": 128,
                     "is_marlin_format": True}, "marlin"),
    "awq gemv": ({"quant_method": "awq", "version": "gemv", "bits": 4, "group_size": 128},
                 "'gemv'"),
    "awq exllama": ({"quant_method": "awq", "version": "exllama", "bits": 4}, "'exllama'"),
    "awq no zeros": ({"quant_method": "awq", "bits": 4, "zero_point": False}, "zero_point"),
    "exl2": ({"quant_method": "exl2", "bits": 4.5}, "'exl2'"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True},
                     "'bitsandbytes'"),
    "group 0": ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_methods_and_settings_are_named(case, written, tmp_path):
    quant, message = UNSUPPORTED[case]
    config = json.loads((written("llama-awq-g32").quantized / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    with pytest.raises(ValueError, match=message) as info:
        load_config(str(tmp_path))
    assert "lacks tensors" not in str(info.value)


def test_quantizing_an_already_quantized_checkpoint_is_refused(written):
    path = str(written("llama-awq-g32").quantized)
    with pytest.raises(ValueError, match=r"already quantized \(AWQ 4-bit, group 32\)"):
        load_model(path, 0, None, "float32", CPU, quantization="int4")
