"""CpuLinear computes exactly the float32 products of ``F.linear``, in another orientation
for a few rows and block by block for widened 16-bit weights. These tests cover the PyTorch
path (the fused 16-bit kernels off); ``test_fused16.py`` covers the kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from molink.model.layers import cpu_linear, fused16
from molink.model.layers.cpu_linear import CpuLinear, use_cpu_linears


@pytest.fixture(autouse=True)
def _pytorch_path_only(monkeypatch):
    monkeypatch.setattr(fused16, "kernels", lambda: None)


def _layer(in_features: int, out_features: int, dtype: torch.dtype, bias: bool) -> CpuLinear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, bias=bias).to(dtype)
    assert use_cpu_linears(torch.nn.Sequential(layer)) == 1
    assert type(layer) is CpuLinear
    return layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 16, 64, 65, 200])
def test_float32_matches_f_linear_for_every_row_count(rows, bias):
    layer = _layer(96, 160, torch.float32, bias)
    x = torch.randn(rows, 96)
    out = layer(x)
    assert out.shape == (rows, 160) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    if 2 <= rows <= 64:  # the other orientation, exactly
        expected = (layer.weight @ x.T).T + (layer.bias if bias else 0)
        assert torch.equal(out, expected)
    else:
        assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


def test_leading_dimensions_are_kept():
    layer = _layer(32, 48, torch.float32, bias=True)
    x = torch.randn(2, 3, 32)  # 6 rows
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("rows", [4, 40, 100])
def test_16_bit_weights_widen_block_by_block(monkeypatch, rows):
    """A scratch of 5 weight rows: 160 outputs are computed in 32 blocks, each exactly the
    float32 product of its rows."""
    monkeypatch.setattr(cpu_linear, "SCRATCH_ELEMENTS", 5 * 96)
    monkeypatch.setattr(cpu_linear, "_scratch", type(cpu_linear._scratch)())
    layer = _layer(96, 160, torch.bfloat16, bias=True)
    x = torch.randn(rows, 96).bfloat16()
    wide = layer.weight.float()
    blocks = [(wide[i:i + 5] @ x.float().T).T if rows <= 64
              else F.linear(x.float(), wide[i:i + 5]) for i in range(0, 160, 5)]
    expected = (torch.cat(blocks, dim=1) + layer.bias.float()).bfloat16()
    assert torch.equal(layer(x), expected)
    scratch = cpu_linear._scratch.buffers[96]
    assert scratch.shape == (5, 96)
    layer(x)
    assert cpu_linear._scratch.buffers[96] is scratch  # reused, not allocated per call


def test_few_rows_of_16_bit_weights_stay_16_bit():
    layer = _layer(96, 160, torch.bfloat16, bias=False)
    x = torch.randn(cpu_linear.FLOAT32_FROM_TOKENS - 1, 96).bfloat16()
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_the_scratch_serves_inside_and_outside_inference_mode(monkeypatch):
    """A scratch first allocated under inference mode (a served step) is written again by a
    call outside it (an ordinary forward in the same thread)."""
    monkeypatch.setattr(cpu_linear, "_scratch", type(cpu_linear._scratch)())
    layer = _layer(96, 160, torch.bfloat16, bias=False).requires_grad_(False)
    x = torch.randn(8, 96).bfloat16()
    with torch.inference_mode():
        inside = layer(x)
    outside = layer(x)
    assert torch.equal(inside, outside)
