"""A decoder layer's small operators through fused16's kernels (``gemm16.c``): RMSNorm,
rotate-half RoPE and SwiGLU on 16-bit activations give PyTorch's results (RoPE bit for bit;
the norm and the gate up to float32 summation order and ``exp``'s last bit: at most one
unit in the last place, rarely), inside the modules and where the loader turns them on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from molink.model.layers import fused16
from molink.model.layers.decoder import RotaryAttention, use_cpu_operators
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.norm import Fp32WeightRMSNorm, RMSNorm
from molink.model.layers.rotary import RotaryEmbedding, apply_rotary

KERNELS = fused16.kernels()
pytestmark = pytest.mark.skipif(KERNELS is None,
                                reason=f"no fused kernels: {fused16.unsupported_reason()}")
DTYPES = [torch.bfloat16, torch.float16]


def _unit(values: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each of ``values`` in their 16-bit dtype (float32)."""
    mantissa = 8 if values.dtype == torch.bfloat16 else 11
    exponent = torch.frexp(values.float().abs().clamp_min(1e-30)).exponent
    return torch.ldexp(torch.ones(exponent.shape), exponent - mantissa)


def _ulps(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|got - expected| in units of the last place of ``expected``'s 16-bit dtype."""
    return (got.float() - expected.float()).abs() / _unit(expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_equals_apply_rotary_bit_for_bit(dtype):
    torch.manual_seed(0)
    rotary = RotaryEmbedding(64, 10000.0, None)
    positions = torch.tensor([0, 5, 17, 300, 4095])
    cos, sin = rotary.cos_sin(positions)
    qkv = (torch.randn(5, (8 + 2 * 2) * 64) * 3).to(dtype)
    q = qkv[:, :512].view(5, 8, 64)  # a view of the qkv output: rows at its stride
    expected = apply_rotary(q, cos, sin)
    untouched = qkv[:, 512:].clone()
    KERNELS.rotary(q, cos, sin)
    assert torch.equal(q, expected)
    assert torch.equal(qkv[:, 512:], untouched)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1024), (16, 2048), (7, 4, 64)])
def test_rms_norm_is_pytorch_s_within_one_unit(dtype, shape):
    """The normalized x (rounded to the dtype) within one unit of PyTorch's (float32 sums in
    another order), so the output within |weight| of that unit plus its own rounding."""
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]) * 0.5 + 1)
    x = (torch.randn(*shape) * 4).to(dtype)
    expected = norm(x)
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    norm.kernel = KERNELS
    got = norm(x)
    assert got.shape == expected.shape and got.dtype == dtype
    bound = norm.weight.float().abs() * _unit(normed) + _unit(expected)
    difference = (got.float() - expected.float()).abs()
    assert (difference <= bound).all() and (difference > 0).float().mean() < 0.01


def test_rms_norm_reads_rows_at_a_stride():
    torch.manual_seed(0)
    norm = RMSNorm(64).bfloat16()
    wide = torch.randn(6, 192).bfloat16()
    x = wide[:, 64:128]  # rows 192 apart
    expected = norm(x)
    norm.kernel = KERNELS
    assert _ulps(norm(x), expected).max() <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16])
def test_swiglu_is_pytorch_s_within_one_unit(dtype, rows):
    torch.manual_seed(rows)
    mlp = GatedMLP(64, 176, "silu").to(dtype)
    x = torch.randn(rows, 64).to(dtype)
    expected = mlp(x)
    mlp.kernel = KERNELS
    gate_up = mlp._gate_up(x)
    gate, up = gate_up.chunk(2, dim=-1)
    assert _ulps(KERNELS.silu_mul(gate_up), F.silu(gate) * up).max() <= 1
    assert torch.equal(mlp(x), mlp._down(KERNELS.silu_mul(gate_up)))  # the module's route
    assert mlp(x).shape == expected.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_add_is_pytorch_s_bit_for_bit(dtype):
    """Sums that round up, down and to even, large and tiny magnitudes, infinities."""
    torch.manual_seed(0)
    h = (torch.randn(16, 1024) * torch.logspace(-6, 4, 1024)).to(dtype)
    x = (torch.randn(16, 1024) * torch.logspace(4, -6, 1024)).to(dtype)
    h[0, :8], x[0, :8] = float("inf"), 1.0
    expected = h + x
    assert torch.equal(KERNELS.add_(h, x), expected)
    with pytest.raises(ValueError):
        KERNELS.add_(h, x[:, :512])


def test_only_the_modules_whose_arithmetic_the_kernels_repeat_take_them():
    plain, fp32_weight = RMSNorm(64), Fp32WeightRMSNorm(64)
    gelu = GatedMLP(64, 128, "gelu")
    model = torch.nn.ModuleList([plain, fp32_weight, gelu])
    marker = object()
    assert use_cpu_operators(model, marker) == 2  # the norm and the MLP (which checks its act)
    assert plain.kernel is marker and fp32_weight.kernel is None
    x = torch.randn(3, 64)  # float32: PyTorch's path, kernel or not
    assert gelu(x).shape == (3, 64)


@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, True), (torch.float32, False)])
def test_the_loader_turns_them_on_for_16_bit_models_on_a_cpu(tiny_model_dir, dtype, expected):
    from molink.model import loader

    model, _ = loader.load_model(str(tiny_model_dir("llama")), 0, 2, str(dtype).split(".")[1],
                                 torch.device("cpu"))
    modules = [m for m in model.modules() if isinstance(m, (RMSNorm, GatedMLP))]
    attentions = [m for m in model.modules() if isinstance(m, RotaryAttention)]
    assert modules and attentions
    assert all((m.kernel is fused16.kernels()) == expected for m in modules)
    assert all((m.rope_kernel is fused16.kernels()) == expected for m in attentions)
