"""int8 / int4 weight-only quantization at load time (``load_model(..., quantization=...)``).

What is checked: the integers and scales a quantizer stores reconstruct, by an explicit loop
over groups, exactly the weight the layer multiplies by (``weight_as``), with PyTorch's CPU
kernels and with the plain fallback; the kernels' output equals ``x @ W.T`` of that weight
within the float accumulation bound below; the loader quantizes every decoder linear of the
checkpoint that way, one tensor at a time, and a stage's logits equal those of the dense
model given the same dequantized weights; embeddings and the LM head stay in the model dtype.

Kernel tolerance: for an output ``y = sum_k x_k w_k`` over K inputs summed in float32 in any
order, ``|y - y_ref| <= K * 2^-23 * sum_k |x_k w_k|`` (the classic gamma_K bound). With bf16
activations the kernels keep partial sums in bf16 (measured: up to 2^-9.3 of the magnitude
sum), so the bound there is one bf16 step of the magnitude sum, ``2^-8 * sum_k |x_k w_k|``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from molink.config import ModelConfig
from molink.model import loader
from molink.model.layers import int_amx, int_linear
from molink.model.layers.cpu_linear import CpuLinear
from molink.model.layers.int_linear import IntLinear
from molink.model.loader import load_model
from molink.model.weight_quant import quantize, quantize_int4, quantize_int8
from molink.runtime.kv_cache import allocate_kv_cache
from tests.model import hf_configs
from tests.model.arch_checks import LOGIT_TOL, make_prompts
from tests.model.gguf_factory import resident_weight_bytes
from tests.model.helpers import prompt_logits
from tests.model_factory import build_model_from_config

CPU = torch.device("cpu")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    made = {}

    def get(wide: bool = False):
        if wide not in made:
            sizes = {"hidden_size": 256, "intermediate_size": 512} if wide else {}
            root = tmp_path_factory.mktemp("wide" if wide else "tiny")
            made[wide] = build_model_from_config(hf_configs.llama_config(**sizes), root / "hf")
        return made[wide]

    return get


def reconstruct(part) -> torch.Tensor:
    """[out, in] float32 from an ``IntWeight``'s codes, scales and zeros, group by group."""
    rows, cols = part.codes.shape
    weight = torch.empty(rows, cols)
    for g in range(cols // part.group_size):
        span = slice(g * part.group_size, (g + 1) * part.group_size)
        weight[:, span] = part.codes[:, span].float() * part.scales[g].float().unsqueeze(1)
        if part.zeros is not None:
            weight[:, span] += part.zeros[g].float().unsqueeze(1)
    return weight


def _quantized(method: str, weight: torch.Tensor, dtype: torch.dtype, group_size: int):
    if method == "int8":
        return quantize_int8(weight, dtype)
    return quantize_int4(weight, dtype, group_size)


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 128), ("int4", 32)])
def test_stored_integers_reconstruct_the_weight_the_layer_uses(method, group_size, dtype,
                                                               use_kernels, permuted):
    """``permuted``: the inputs stored in another order, as GPTQ act-order does (``perm``)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 256, generator=gen) * 0.05  # [out, in]
    perm = torch.randperm(256, generator=gen) if permuted else torch.arange(256)
    part = _quantized(method, weight[:, perm], dtype, group_size)
    low, high = (-128, 127) if method == "int8" else (-8, 7)
    assert part.codes.dtype == torch.int8
    assert low <= part.codes.min().item() and part.codes.max().item() <= high
    assert torch.equal(part.scales, part.scales.to(dtype).float())  # kept in the model dtype
    stored_order = reconstruct(part)  # [out, in], column j is input perm[j]
    if dtype == torch.float32:  # round to nearest: within half a step (and a rounding)
        step = part.scales.repeat_interleave(part.group_size, 0).t()
        assert ((stored_order - weight[:, perm]).abs() <= step * (0.5 + 1e-5)).all()
    expected = torch.empty_like(stored_order)
    expected[:, perm] = stored_order
    layer = IntLinear(256, 96)
    layer.set_weight([part._replace(perm=perm if permuted else None)], dtype, CPU,
                     use_kernels=use_kernels)
    kinds = {block.kind for block in layer.blocks}
    kernel = use_kernels and (method == "int8" or dtype == torch.bfloat16)  # int4: bf16 only
    amx = dtype == torch.bfloat16 and int_amx.kernels() is not None  # int_amx: AMX CPUs
    kernel_kind = ("int8amx" if amx else "int8pack") if method == "int8" else (
        "groupamx" if amx else "int4pack")
    assert kinds == ({kernel_kind} if kernel else {"bytes" if method == "int8" else "nibbles"})
    assert torch.equal(layer.weight_as(dtype), expected.to(dtype))
    for num_tokens in (1, 16):
        x = torch.randn(num_tokens, 256, generator=gen).to(dtype)
        used = expected.to(dtype).float()
        reference = x.float() @ used.t()
        magnitude = x.float().abs() @ used.abs().t()  # sum_k |x_k w_k|
        bound = magnitude * (2.0 ** -8 if dtype == torch.bfloat16 else 256 * 2.0 ** -23)
        assert ((layer(x).float() - reference).abs() <= bound).all(), (num_tokens, kinds)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_int8_bf16_prefill_dequantizes_where_the_cpu_has_native_bf16(monkeypatch, native_bf16):
    """The int8 kernel computes one row at a time: with native bf16 a prefill's rows take the
    dequantized weight and PyTorch's bf16 product, a decode's rows stay on the kernel."""
    monkeypatch.setattr(int_linear, "has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(int_amx, "kernels", lambda: None)  # PyTorch's kernel, AMX or not
    gen = torch.Generator().manual_seed(0)
    layer = IntLinear(256, 96)
    layer.set_weight([quantize_int8(torch.randn(96, 256, generator=gen) * 0.05,
                                    torch.bfloat16)], torch.bfloat16, CPU)
    start = int_linear.INT8_DEQUANTIZE_FROM_TOKENS
    assert layer.int8_dequantize_from == (start if native_bf16 else None)
    assert [block.kind for block in layer.blocks] == ["int8pack"]
    for rows in (1, start - 1, start, 100):
        x = torch.randn(rows, 256, generator=gen).bfloat16()
        kernel = torch.ops.aten._weight_int8pack_mm(x, layer.qweight0, layer.scales0)
        dequantized = F.linear(x, layer.weight_as(torch.bfloat16))
        expected = dequantized if native_bf16 and rows >= start else kernel
        assert torch.equal(layer(x), expected), rows


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_loader_quantizes_each_decoder_linear_and_logits_equal_the_dequantized_model(
        method, model_dir):
    directory = model_dir()
    checkpoint = load_file(str(directory / "model.safetensors"))
    model, _ = load_model(str(directory), 0, None, "float32", CPU, quantization=method)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, IntLinear)}
    assert len(linears) == 4 * 4  # qkv, o, gate_up, down per layer
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    # the head stays a dense float32 linear (CpuLinear: nn.Linear with CPU-fast products)
    assert type(model.lm_head) is CpuLinear and model.lm_head.weight.dtype == torch.float32
    dense, _ = load_model(str(directory), 0, None, "float32", CPU)
    for name, module in linears.items():
        leaf = name.rpartition(".")[2]
        sources = [f"{name.replace(leaf, part)}.weight" for part in FUSED.get(leaf, (leaf,))]
        expected = torch.cat([reconstruct(quantize(checkpoint[s], method, torch.float32))
                              for s in sources])
        assert torch.equal(module.weight_as(torch.float32), expected), name
        dense.get_submodule(name).weight.data.copy_(expected)
    for stage in (model, dense):
        allocate_kv_cache(stage.attention_layers(), 64, 4, torch.float32, CPU)
    for prompt in make_prompts(512, (23, 40)):
        got, want = prompt_logits([model], prompt), prompt_logits([dense], prompt)
        assert (got - want).abs().max().item() <= LOGIT_TOL


def test_each_linear_weight_is_read_and_quantized_alone(model_dir, monkeypatch):
    calls = []
    real = loader.CheckpointFiles.read
    monkeypatch.setattr(loader.CheckpointFiles, "read",
                        lambda self, names, *a, **k: calls.append(list(names)) or real(
                            self, names, *a, **k))
    load_model(str(model_dir()), 1, 3, "float32", CPU, quantization="int4")
    linear_reads = [names for names in calls if any("_proj." in n for n in names)]
    assert len(linear_reads) == 2 * 7 and all(len(names) == 1 for names in linear_reads)


@pytest.mark.parametrize("method,limit", [("int4", 0.35), ("int8", 0.55)])
def test_quantized_stage_memory_is_measured_below_its_share_of_bf16(method, limit, model_dir):
    """Measured: bytes of the storages behind a bf16 middle stage's parameters and buffers."""
    model, _ = load_model(str(model_dir(wide=True)), 1, 3, "bfloat16", CPU,
                          quantization=method)
    linears = [m for m in model.modules() if isinstance(m, IntLinear)]
    assert len(linears) == 2 * 4
    bf16_bytes = 2 * sum(m.in_features * m.out_features for m in linears)
    bf16_bytes += 2 * sum(p.numel() for p in model.parameters())  # norms
    resident = resident_weight_bytes(model)
    assert resident <= limit * bf16_bytes, (resident, bf16_bytes, resident / bf16_bytes)


def test_a_stage_executor_loads_with_the_configured_quantization(model_dir):
    from molink.config import CacheConfig
    from molink.runtime.stage_executor import StageExecutor

    config = ModelConfig(model=str(model_dir()), dtype="bfloat16", device="cpu",
                         start_layer=1, end_layer=3, quantization="int4")
    executor = StageExecutor(config, CacheConfig(block_size=8, num_blocks=8))
    linears = [m for m in executor.model.modules() if isinstance(m, IntLinear)]
    assert len(linears) == 2 * 4 and executor.dtype == torch.bfloat16


def test_bad_quantization_values_are_value_errors(model_dir):
    with pytest.raises(ValueError, match="quantization must be one of int8, int4"):
        ModelConfig(model="m", quantization="int3")
    assert ModelConfig(model="m", quantization="int4").quantization == "int4"
    with pytest.raises(ValueError, match="quantization must be one of int8, int4 or None"):
        load_model(str(model_dir()), 0, None, "float32", CPU, quantization="fp8")


def test_quantizing_a_gguf_file_is_refused(tmp_path, model_dir):
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType

    from tests.model.gguf_factory import write_gguf

    path = write_gguf(model_dir(), tmp_path / "m.gguf", GGMLQuantizationType.Q8_0)
    with pytest.raises(ValueError, match=r"already quantized \(GGUF\)"):
        load_model(str(path), 0, None, "float32", CPU, quantization="int8")
