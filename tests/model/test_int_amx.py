"""The AMX kernel for 4-, 8- and 16-bit weights (``int_amx``): its block layout, its products
against float64, where ``IntLinear`` uses it, and that it stays out of the way where it
cannot run."""

from __future__ import annotations

import pytest
import torch

from molink import envs
from molink.model.cpu_features import cpu_flags
from molink.model.layers import fused16, int_amx
from molink.model.layers.int_linear import IntLinear
from molink.model.weight_quant import quantize_int4, quantize_int8

REASON = int_amx.unsupported_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"no AMX kernel: {REASON}")
CPU = torch.device("cpu")


def _codes(out_features: int, in_features: int, bits: int, gen=None) -> torch.Tensor:
    low = -(1 << (bits - 1))
    return torch.randint(low, -low, (out_features, in_features), generator=gen,
                         dtype=torch.int8)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_features,in_features", [(16, 32), (37, 70), (130, 1000)])
def test_pack_puts_each_pair_of_inputs_of_an_output_side_by_side(out_features, in_features,
                                                                 bits):
    codes = _codes(out_features, in_features, bits)
    tiles = int_amx.pack(codes, bits)
    per_row = 32 if bits == 8 else 16
    assert tiles.shape == (-(-out_features // 16), -(-in_features // 32), 16, per_row)
    # block (b, c), row p, position 2n + parity: output 16b + n, input 32c + 2p + parity
    b, c, p, n, parity = tiles.shape[0] - 1, tiles.shape[1] - 1, 3, 13, 1
    row, column = 16 * b + n, 32 * c + 2 * p + parity
    expected = codes[row, column] if row < out_features and column < in_features else 0
    position = 2 * n + parity
    if bits == 8:
        stored = tiles[b, c, p, position]
    else:  # position j in byte j's low nibble, j + 16 in byte j's high nibble, plus 8
        byte = int(tiles[b, c, p, position % 16])
        stored = (byte >> 4 if position >= 16 else byte & 0x0F) - 8
    assert stored == expected  # padding is a zero code
    assert torch.equal(int_amx.unpack(tiles, out_features, in_features, bits), codes)


def test_group_scales_are_kept_in_bf16_padded_to_whole_blocks():
    """2 bytes a group and output, for 4- and 8-bit codes alike (the kernel pairs them)."""
    values = (torch.arange(2 * 20, dtype=torch.float32).view(2, 20) - 7) / 64
    stored = int_amx.group_values(values)
    assert stored.dtype == torch.bfloat16 and stored.shape == (2, 32)
    assert stored[1, :2].float().tolist() == [13 / 64, 14 / 64] and stored[:, 20:].eq(0).all()
    assert torch.equal(int_amx.ungroup_values(stored, 20), values)


def test_supported_formats():
    assert int_amx.supports(8, 0) and int_amx.supports(8, 32) and int_amx.supports(4, 128)
    assert not int_amx.supports(4, 0)  # 4-bit needs group scales
    assert not int_amx.supports(4, 48)  # groups must cover whole 32-input blocks
    assert not int_amx.supports(3, 32)


def test_kernel_is_expected_where_the_cpu_has_amx_and_a_compiler():
    """On a CPU with AMX-BF16 and a C compiler the kernel must run, not fall back silently."""
    flags = cpu_flags() or frozenset()
    if int_amx.REQUIRED_FLAGS <= flags and fused16.compiler() and envs.cpu_kernels_enabled():
        assert REASON is None
        assert int_amx.kernels() is not None


def test_turned_off_with_the_cpu_kernels_switch(monkeypatch):
    monkeypatch.setenv(envs.CPU_KERNELS_VAR, "0")
    assert int_amx.unsupported_reason() == f"{envs.CPU_KERNELS_VAR}=0"


def _within_bound(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                  terms: torch.Tensor | None = None) -> bool:
    """bf16 products summed in float32, rounded to bf16 once: within bf16's unit roundoff
    (2^-8) of the float64 result plus the float32 summation bound (K 2^-23 sum |x_k w_k|,
    over ``terms``' magnitudes where the weight is summed as parts: code * scale, zero)."""
    reference = x.double() @ weight.double().T
    terms = weight if terms is None else terms
    magnitude = x.double().abs() @ terms.double().abs().T
    bound = reference.abs() * 2.0 ** -8 + magnitude * x.shape[1] * 2.0 ** -23
    return bool(((got.double() - reference).abs() <= bound).all())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 63, 64, 65, 130])
def test_int8_with_a_scale_per_output_widens_exactly(rows):
    gen = torch.Generator().manual_seed(rows)
    codes = _codes(75, 300, 8, gen)  # padded blocks on both sides
    scales = (torch.rand(75, generator=gen) * 0.02).bfloat16()
    x = torch.randn(rows, 300, generator=gen).bfloat16()
    got = int_amx.kernels().matmul(x, int_amx.pack(codes), 75, int_amx.pad_scales(scales))
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 75)
    assert _within_bound(got, x, codes.double() * scales.double()[:, None])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 16, 17, 64, 65])
@pytest.mark.parametrize("bits,group_size,asymmetric", [(4, 32, True), (4, 128, False),
                                                         (8, 32, False), (8, 64, True)])
def test_grouped_codes_multiply_as_their_dequantized_bf16_weight(bits, group_size, asymmetric,
                                                                 rows):
    """Scales and zeros in bf16, as ``IntLinear`` keeps them. 8-bit: each block widens to code
    * scale + zero rounded to bf16, and the product is that weight's; 4-bit: codes multiply
    exactly, scales and zeros apply to the group sums, and the product is the exact
    weight's; within the bound."""
    gen = torch.Generator().manual_seed(rows)
    out_features, in_features = 75, 256
    groups = in_features // group_size
    codes = _codes(out_features, in_features, bits, gen)
    scales = (torch.rand(groups, out_features, generator=gen) * 0.02).bfloat16().float()
    zeros = (torch.randn(groups, out_features, generator=gen) * 0.01).bfloat16().float()
    grouped = codes.float().view(out_features, groups, group_size) * scales.t()[..., None]
    if asymmetric:
        grouped = grouped + zeros.t()[..., None]
    exact = grouped.view(out_features, in_features)
    parts = (codes.float().view(out_features, groups, group_size).abs() * scales.t()[..., None]
             + (zeros.t()[..., None].abs() if asymmetric else 0)).view(out_features, in_features)
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    got = int_amx.kernels().matmul(
        x, int_amx.pack(codes, bits), out_features, int_amx.group_values(scales), bits,
        group_size, int_amx.group_values(zeros) if asymmetric else None)
    if bits == 8:
        assert _within_bound(got, x, exact.bfloat16().float())
    else:
        assert _within_bound(got, x, exact, terms=parts)


@needs_kernel
def test_threads_split_the_outputs_not_the_sums():
    gen = torch.Generator().manual_seed(0)
    codes = _codes(200, 256, 8, gen)
    scales = int_amx.pad_scales(torch.rand(200, generator=gen).bfloat16())
    x = torch.randn(20, 256, generator=gen).bfloat16()
    tiles = int_amx.pack(codes)
    _same_with_1_2_3_threads(lambda: int_amx.kernels().matmul(x, tiles, 200, scales))


def _same_with_1_2_3_threads(compute) -> None:
    """``compute()`` gives bit-identical results with 1, 2 and 3 threads."""
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(compute())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], other) for other in results[1:])


@needs_kernel
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_int_linear_takes_the_kernel_for_bf16_and_reads_its_weight_back(method):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 256, generator=gen) * 0.05
    if method == "int8":  # codes times the scale of their sums: the exact weight
        part = quantize_int8(weight, torch.bfloat16)
        dense = part.codes.float() * part.scales[0].float()[:, None]
        multiplied = dense
    else:  # codes times scales, plus zeros, on the group sums: the exact weight
        part = quantize_int4(weight, torch.bfloat16, 128)
        dense = part.dequantize()
        multiplied = dense
    layer = IntLinear(256, 96)
    layer.set_weight([part], torch.bfloat16, CPU)
    assert [block.kind for block in layer.blocks] == [
        "int8amx" if method == "int8" else "groupamx"]
    assert torch.equal(layer.weight_as(torch.bfloat16), dense.bfloat16())
    x = torch.randn(3, 256, generator=gen).bfloat16()
    assert _within_bound(layer(x), x, multiplied)
    x32 = x.float()  # another dtype: the dequantized weight, exactly
    assert torch.equal(layer(x32), x32 @ layer.weight_as(torch.float32).T)


@needs_kernel
def test_a_layer_on_the_kernel_copies_and_pickles():
    import copy
    import io

    layer = IntLinear(256, 96)
    layer.set_weight([quantize_int4(torch.randn(96, 256) * 0.05, torch.bfloat16, 128)],
                     torch.bfloat16, CPU)
    x = torch.randn(2, 256).bfloat16()
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        assert other.amx is layer.amx and torch.equal(other(x), layer(x))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_stays_on_pytorch_kernels_without_amx(monkeypatch, method):
    monkeypatch.setattr(int_amx, "kernels", lambda: None)
    weight = torch.randn(96, 256) * 0.05
    part = (quantize_int8(weight, torch.bfloat16) if method == "int8"
            else quantize_int4(weight, torch.bfloat16, 128))
    layer = IntLinear(256, 96)
    layer.set_weight([part], torch.bfloat16, CPU)
    assert [block.kind for block in layer.blocks] == [f"{method}pack"]


@pytest.mark.parametrize("out_features,in_features", [(32, 32), (37, 70), (130, 1000)])
def test_bf16_weights_pack_into_the_same_tiles_padded_to_pairs_of_blocks(out_features,
                                                                         in_features):
    weight = torch.randn(out_features, in_features).bfloat16()
    tiles = int_amx.pack16(weight)
    assert tiles.dtype == torch.bfloat16
    assert tiles.shape == (-(-out_features // 32) * 2, -(-in_features // 32), 16, 32)
    # block (b, c), row p, position 2n + parity: output 16b + n, input 32c + 2p + parity
    b, c, p, n, parity = 1, tiles.shape[1] - 1, 5, 3, 0
    row, column = 16 * b + n, 32 * c + 2 * p + parity
    expected = weight[row, column] if row < out_features and column < in_features else 0
    assert tiles[b, c, p, 2 * n + parity] == expected
    assert torch.equal(int_amx.unpack16(tiles, out_features, in_features), weight)


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 5, 16, 17, 31, 32, 33, 48, 64, 65, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_weights_multiply_within_the_bound_for_any_rows(rows, bias):
    """Rows in slices of 32 (two A tiles), the last slice of any size; outputs in pairs of
    blocks, padded. Without a bias: within ``_within_bound``; with one: the float32 sums
    plus the bias, rounded once (bf16's roundoff of the result plus the summation bound)."""
    gen = torch.Generator().manual_seed(rows)
    weight = (torch.randn(75, 300, generator=gen) * 0.05).bfloat16()
    x = torch.randn(rows, 300, generator=gen).bfloat16()
    shift = torch.randn(75, generator=gen).bfloat16() if bias else None
    padded = None if shift is None else int_amx.pad_scales(shift, int_amx.BLOCK_PAIR)
    got = int_amx.kernels().matmul16(x, int_amx.pack16(weight), 75, padded)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 75)
    if shift is None:
        assert _within_bound(got, x, weight)
        return
    reference = x.double() @ weight.double().T + shift.double()
    magnitude = x.double().abs() @ weight.double().abs().T + shift.double().abs()
    bound = reference.abs() * 2.0 ** -8 + magnitude * (x.shape[1] + 1) * 2.0 ** -23
    assert ((got.double() - reference).abs() <= bound).all()


@needs_kernel
def test_bf16_threads_split_the_pairs_of_blocks_not_the_sums():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 256, generator=gen).bfloat16()
    tiles = int_amx.pack16(weight)
    x = torch.randn(40, 256, generator=gen).bfloat16()
    _same_with_1_2_3_threads(lambda: int_amx.kernels().matmul16(x, tiles, 200))


@needs_kernel
def test_a_bias_not_padded_for_the_kernel_is_refused():
    tiles = int_amx.pack16(torch.randn(40, 64).bfloat16())
    x = torch.randn(2, 64).bfloat16()
    for bias in (torch.zeros(40), torch.zeros(64).bfloat16()):  # unpadded; wrong dtype
        with pytest.raises(ValueError, match="bias"):
            int_amx.kernels().matmul16(x, tiles, 40, bias)


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 128])
def test_group_sums_are_each_rows_sums_over_each_group(group_size):
    """The zeros' share of 4-bit codes (both the module path and ``decode_layers`` take the
    sums from this one function): within float32 summation's bound of the exact sums."""
    gen = torch.Generator().manual_seed(group_size)
    x = torch.randn(5, 256, generator=gen).bfloat16()
    got = int_amx.kernels().group_sums(x, group_size)
    grouped = x.double().view(5, 256 // group_size, group_size)
    assert got.dtype == torch.float32 and got.shape == grouped.shape[:2]
    bound = group_size * 2.0 ** -24 * grouped.abs().sum(-1)
    assert ((got.double() - grouped.sum(-1)).abs() <= bound).all()
