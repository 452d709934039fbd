"""bf16 linears packed once (CPUs with native bf16), in AMX tiles for MoLink's kernel or for
oneDNN: the same products as the plain weight, the checkpoint's weights read back, and out
of the way where packing cannot run (the AVX2 CI machines: oneDNN refuses bf16 there,
checked here by capping its ISA)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from molink import envs
from molink.model.layers import packed_linear
from molink.model.layers.cpu_linear import set_linear_weight
from molink.model.layers.packed_linear import AmxLinear, PackedLinear, pack_linears

REASON = packed_linear.unsupported_reason()
needs_packing = pytest.mark.skipif(REASON is not None, reason=f"no packed bf16: {REASON}")
AMX = packed_linear.amx_kernel()
KINDS = {"amx": AmxLinear, "onednn": PackedLinear}


@pytest.fixture(params=sorted(KINDS))
def kind(request, monkeypatch) -> type[nn.Linear]:
    """Each packing this machine has: AMX tiles (MoLink's kernel), oneDNN's layout."""
    if request.param == "amx" and AMX is None:
        pytest.skip(f"no AMX kernel here: {packed_linear.int_amx.unsupported_reason()}")
    if request.param == "onednn":
        monkeypatch.setattr(packed_linear, "amx_kernel", lambda: None)
    return KINDS[request.param]


def _packed(kind: type[nn.Linear], out_features: int, in_features: int,
            bias: bool) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias).bfloat16()
    weight = layer.weight.detach().clone()
    assert pack_linears(nn.Sequential(layer)) == 1 and type(layer) is kind
    return layer, weight


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 32, 45, 100])
def test_packed_linear_computes_the_products_of_the_weight(kind, rows, bias):
    layer, weight = _packed(kind, 40, 72, bias)
    x = torch.randn(2, rows, 72).bfloat16()
    out = layer(x)
    assert out.shape == (2, rows, 40) and out.dtype == torch.bfloat16
    expected = x.float() @ weight.float().T + (layer.bias.float() if bias else 0)
    # float32 accumulation, one rounding to bf16 (as the plain bf16 product)
    assert (out.float() - expected).abs().max() <= expected.abs().max() * 2 ** -7
    plain = F.linear(x, weight, layer.bias)
    assert (out.float() - plain.float()).abs().max() <= expected.abs().max() * 2 ** -6


@needs_packing
def test_packed_linear_reads_strided_activations(kind):
    layer, weight = _packed(kind, 40, 72, bias=True)
    for x in (torch.randn(72, 5).bfloat16().T, torch.randn(5, 144).bfloat16()[:, ::2]):
        assert not x.is_contiguous()
        expected = x.float() @ weight.float().T + layer.bias.float()
        assert (layer(x).float() - expected).abs().max() <= expected.abs().max() * 2 ** -7


@needs_packing
def test_packed_weights_read_back_and_save_as_the_checkpoints(kind):
    layer, weight = _packed(kind, 24, 32, bias=True)
    assert torch.equal(layer.weight, weight)
    assert [name for name, _ in layer.named_parameters()] == [
        "bias", "tiles" if kind is AmxLinear else "packed"]
    state = layer.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], weight)
    replacement = torch.randn(24, 32).bfloat16()
    set_linear_weight(layer, replacement)
    assert torch.equal(layer.weight, replacement)
    x = torch.randn(3, 32).bfloat16()
    expected = x.float() @ replacement.float().T + layer.bias.float()
    assert (layer(x).float() - expected).abs().max() <= expected.abs().max() * 2 ** -7


@needs_packing
def test_a_float32_caller_gets_the_exact_float32_product(kind):
    layer, weight = _packed(kind, 16, 32, bias=False)
    x = torch.randn(5, 32)
    assert torch.equal(layer(x), F.linear(x, weight.float()))


@needs_packing
def test_only_unshared_bf16_linears_are_packed(kind):
    tied_a, tied_b = nn.Linear(32, 16, bias=False).bfloat16(), nn.Linear(32, 16, bias=False)
    tied_b.weight = tied_a.weight
    model = nn.Sequential(nn.Linear(32, 16).bfloat16(), nn.Linear(32, 16), tied_a, tied_b,
                          nn.Linear(32, 16).half())
    assert pack_linears(model) == 1
    assert [type(m) for m in model] == [kind, nn.Linear, nn.Linear, nn.Linear, nn.Linear]
    assert tied_a.weight is tied_b.weight


def test_a_cpu_with_amx_and_a_compiler_packs_for_amx():
    """No silent fallback to oneDNN where MoLink's kernel can run."""
    if packed_linear.int_amx.unsupported_reason() is not None:
        pytest.skip(f"no AMX kernel here: {packed_linear.int_amx.unsupported_reason()}")
    assert AMX is not None
    layer = nn.Linear(32, 16).bfloat16()
    assert pack_linears(nn.Sequential(layer)) == 1 and type(layer) is AmxLinear


@pytest.mark.skipif(AMX is None, reason="no AMX kernel here")
def test_amx_linears_copy_and_pickle():
    layer, weight = _packed(AmxLinear, 40, 72, bias=True)
    x = torch.randn(3, 72).bfloat16()
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(twin) is AmxLinear and torch.equal(twin.weight, weight)
        assert torch.equal(twin(x), layer(x))


def test_packing_off_leaves_plain_linears(monkeypatch):
    monkeypatch.setenv(envs.CPU_KERNELS_VAR, "0")
    assert packed_linear.unsupported_reason() == f"{envs.CPU_KERNELS_VAR}=0"
    layer = nn.Linear(32, 16).bfloat16()
    assert pack_linears(nn.Sequential(layer)) == 0 and type(layer) is nn.Linear


def test_where_onednn_refuses_bf16_linears_stay_plain_and_compute():
    """oneDNN capped at AVX2 (the CI machines' ISA) refuses to pack bf16: the self-check
    names the reason, nothing is packed, and the model's products are PyTorch's own."""
    script = """
import json, torch
from torch import nn
from molink.model.layers import packed_linear
packed_linear.amx_kernel = lambda: None  # nor AMX: the AVX2 machines have none
layer = nn.Linear(32, 16).bfloat16()
count = packed_linear.pack_linears(nn.Sequential(layer))
x = torch.randn(3, 32).bfloat16()
print(json.dumps({"reason": packed_linear.unsupported_reason(), "count": count,
                  "plain": type(layer) is nn.Linear,
                  "same": torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight,
                                                                           layer.bias))}))
"""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", DNNL_MAX_CPU_ISA="AVX2")
    env.pop(envs.CPU_KERNELS_VAR, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "oneDNN" in (result["reason"] or "")
    assert result["count"] == 0 and result["plain"] and result["same"]
