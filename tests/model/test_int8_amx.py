"""The AMX int8 kernel (``int8_amx``): its block layout, its products against float64, where
``IntLinear`` uses it, and that it stays out of the way where it cannot run."""

from __future__ import annotations

import pytest
import torch

from molink import envs
from molink.model.cpu_features import cpu_flags
from molink.model.layers import fused16, int8_amx
from molink.model.layers.int_linear import IntLinear
from molink.model.weight_quant import quantize_int8

REASON = int8_amx.unsupported_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"no AMX int8 kernel: {REASON}")


@pytest.mark.parametrize("out_features,in_features", [(16, 32), (37, 70), (130, 1000)])
def test_pack_puts_each_pair_of_inputs_of_an_output_side_by_side(out_features, in_features):
    codes = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8)
    tiles = int8_amx.pack(codes)
    assert tiles.shape == (-(-out_features // 16), -(-in_features // 32), 16, 32)
    # block (b, c), row p, column 2n + parity: output 16b + n, input 32c + 2p + parity
    b, c, p, n, parity = tiles.shape[0] - 1, tiles.shape[1] - 1, 3, 5, 1
    row, column = 16 * b + n, 32 * c + 2 * p + parity
    expected = codes[row, column] if row < out_features and column < in_features else 0
    assert tiles[b, c, p, 2 * n + parity] == expected  # padding is zero
    assert torch.equal(int8_amx.unpack(tiles, out_features, in_features), codes)


def test_kernel_is_expected_where_the_cpu_has_amx_and_a_compiler():
    """On a CPU with AMX-BF16 and a C compiler the kernel must run, not fall back silently."""
    flags = cpu_flags() or frozenset()
    if int8_amx.REQUIRED_FLAGS <= flags and fused16.compiler() and envs.cpu_kernels_enabled():
        assert REASON is None
        assert int8_amx.kernels() is not None


def test_turned_off_with_the_cpu_kernels_switch(monkeypatch):
    monkeypatch.setenv(envs.CPU_KERNELS_VAR, "0")
    assert int8_amx.unsupported_reason() == f"{envs.CPU_KERNELS_VAR}=0"


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 63, 64, 65, 130])
def test_products_are_exact_sums_rounded_once(rows):
    """Products of bf16 activations and int8 codes are exact in float32 and summed in float32,
    then scaled and rounded to bf16 once: within bf16's unit roundoff (2^-8) of the float64 result plus
    the float32 summation bound (``K * 2^-23 * sum_k |x_k w_k|``)."""
    gen = torch.Generator().manual_seed(rows)
    out_features, in_features = 75, 300  # padded blocks on both sides
    codes = torch.randint(-128, 128, (out_features, in_features), generator=gen,
                          dtype=torch.int8)
    scales = (torch.rand(out_features, generator=gen) * 0.02).bfloat16()
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    got = int8_amx.kernels().matmul(x, int8_amx.pack(codes), int8_amx.pad_scales(scales),
                                    out_features)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    weight = codes.double() * scales.double()[:, None]
    reference = x.double() @ weight.T
    magnitude = x.double().abs() @ weight.abs().T
    bound = reference.abs() * 2.0 ** -8 + magnitude * in_features * 2.0 ** -23
    assert ((got.double() - reference).abs() <= bound).all()


@needs_kernel
def test_threads_split_the_outputs_not_the_sums():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (200, 256), generator=gen, dtype=torch.int8)
    scales = int8_amx.pad_scales(torch.rand(200, generator=gen).bfloat16())
    x = torch.randn(20, 256, generator=gen).bfloat16()
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(int8_amx.kernels().matmul(x, int8_amx.pack(codes), scales, 200))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], other) for other in results[1:])


@needs_kernel
def test_int_linear_takes_the_kernel_for_bf16_and_reads_its_weight_back():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 256, generator=gen) * 0.05
    part = quantize_int8(weight, torch.bfloat16)
    layer = IntLinear(256, 96)
    layer.set_weight([part], torch.bfloat16, torch.device("cpu"))
    assert [block.kind for block in layer.blocks] == ["int8amx"]
    dense = (part.codes.float() * part.scales[0].float()[:, None]).bfloat16()
    assert torch.equal(layer.weight_as(torch.bfloat16), dense)
    x = torch.randn(3, 256, generator=gen).bfloat16()
    kernel = int8_amx.kernels().matmul(x, int8_amx.pack(part.codes),
                                       int8_amx.pad_scales(part.scales[0].bfloat16()), 96)
    assert torch.equal(layer(x), kernel)
    x32 = x.float()  # another dtype: the dequantized weight, exactly
    assert torch.equal(layer(x32), x32 @ layer.weight_as(torch.float32).T)


def test_int8_stays_on_pytorch_kernel_without_amx(monkeypatch):
    monkeypatch.setattr(int8_amx, "kernels", lambda: None)
    layer = IntLinear(256, 96)
    layer.set_weight([quantize_int8(torch.randn(96, 256) * 0.05, torch.bfloat16)],
                     torch.bfloat16, torch.device("cpu"))
    assert [block.kind for block in layer.blocks] == ["int8pack"]
