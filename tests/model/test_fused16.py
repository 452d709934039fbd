"""The fused 16-bit kernels: compiled once per machine, equal to float32 products of the
widened weights, used by ``TiledCpuLinear``, and out of the way where they cannot run."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from molink import envs
from molink.model.layers import cpu_linear, fused16
from molink.model.layers.cpu_linear import (
    CpuLinear,
    TiledCpuLinear,
    set_linear_weight,
    use_cpu_linears,
)

REASON = fused16.unsupported_reason()
needs_kernels = pytest.mark.skipif(REASON is not None, reason=f"no fused kernels: {REASON}")
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """Kernels compiled into an empty directory, forgotten again afterwards."""
    monkeypatch.setenv(envs.KERNEL_DIR_VAR, str(tmp_path))
    fused16.kernels.cache_clear()
    yield tmp_path
    fused16.kernels.cache_clear()


def test_kernels_are_expected_here_on_x86_with_a_compiler():
    """The CI machines and this project's hosts are AVX2 x86-64 with gcc: the kernels must
    run there, not fall back silently."""
    import platform
    import shutil

    if platform.machine() == "x86_64" and shutil.which("cc") and (
            torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")):
        assert REASON is None
        assert fused16.kernels() is not None


@needs_kernels
def test_compiled_once_then_reused(fresh_kernels):
    first = fused16.kernels()
    assert first is not None and first.path.parent == fresh_kernels
    built = first.path.stat().st_mtime_ns
    fused16.kernels.cache_clear()
    again = fused16.kernels()
    assert again.path == first.path and again.path.stat().st_mtime_ns == built
    assert [p.name for p in fresh_kernels.iterdir()] == [first.path.name]  # no temp files left


@pytest.mark.parametrize("out_features,in_features", [(8, 16), (11, 37), (24, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_and_unpack_are_inverse(out_features, in_features, dtype):
    weight = torch.randn(out_features, in_features).to(dtype)
    tiles = fused16.pack(weight)
    assert tiles.shape == (-(-out_features // 8), -(-in_features // 16), 8, 16)
    assert torch.equal(fused16.unpack(tiles, out_features, in_features), weight)
    padded = fused16.unpacked(tiles).reshape(tiles.shape[0] * 8, -1)
    assert padded[out_features:].count_nonzero() == 0
    assert padded[:, in_features:].count_nonzero() == 0


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features,in_features", [(11, 37), (64, 32), (1000, 1024)])
def test_matmul_equals_float32_products(out_features, in_features, dtype, rows, threads):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    x = torch.randn(rows, in_features, generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = fused16.kernels().matmul(x, fused16.pack(weight), out_features)
    finally:
        torch.set_num_threads(before)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    # the same float32 products, summed in another order
    torch.testing.assert_close(out, x @ weight.float().T, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_matmul_rejects_a_mismatched_width():
    tiles = fused16.pack(torch.randn(8, 32).bfloat16())
    with pytest.raises(ValueError, match="columns"):
        fused16.kernels().matmul(torch.randn(1, 48), tiles, 8)


def _tiled(out_features: int, in_features: int, dtype: torch.dtype, bias: bool):
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    weight = layer.weight.detach().clone()
    assert use_cpu_linears(nn.Sequential(layer)) == 1
    assert type(layer) is TiledCpuLinear
    return layer, weight


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 4, 32, 33, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_linear_computes_float32_products(dtype, rows, bias):
    """Up to MAX_ROWS rows through the kernel, more widened from the tiles: both the float32
    product of the 16-bit weight, rounded once to the activation dtype."""
    layer, weight = _tiled(100, 72, dtype, bias)
    x = torch.randn(2, rows, 72).to(dtype)
    expected = x.float() @ weight.float().T + (layer.bias.float() if bias else 0)
    out = layer(x)
    assert out.shape == (2, rows, 100) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    assert (out.float() - expected).abs().max() <= expected.abs().max() * 2 ** -7  # one rounding


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tiled_linear_takes_no_rows_and_float32_input(dtype):
    """Shapes the model rarely sends: an empty batch, float32 activations, and an output
    width the tiles pad (100 -> 104)."""
    layer, weight = _tiled(100, 72, torch.bfloat16, bias=True)
    assert layer(torch.randn(0, 72).to(dtype)).shape == (0, 100)
    x = torch.randn(3, 2, 72).to(dtype)
    out = layer(x)
    assert out.shape == (3, 2, 100) and out.dtype == dtype
    torch.testing.assert_close(out.float(), x.float() @ weight.float().T + layer.bias.float(),
                               rtol=1e-2, atol=1e-2)


@needs_kernels
def test_tiled_widening_block_by_block_is_exact(monkeypatch):
    """More rows than the kernel takes: a scratch of one tile row (8 weights) at a time, each
    block exactly the float32 product of its rows."""
    monkeypatch.setattr(cpu_linear, "SCRATCH_ELEMENTS", 5 * 96)
    monkeypatch.setattr(cpu_linear, "_scratch", type(cpu_linear._scratch)())
    layer, weight = _tiled(40, 96, torch.bfloat16, bias=False)
    x = torch.randn(80, 96).bfloat16()
    blocks = [F.linear(x.float(), weight.float()[i:i + 8]) for i in range(0, 40, 8)]
    assert torch.equal(layer(x), torch.cat(blocks, dim=1).bfloat16())
    assert cpu_linear._scratch.buffers[96].shape == (8, 96)


@needs_kernels
def test_tiled_linear_reads_and_writes_its_weight_row_major():
    layer, weight = _tiled(20, 40, torch.bfloat16, bias=True)
    assert torch.equal(layer.weight, weight)
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert torch.equal(layer.state_dict()["weight"], weight)
    assert {name for name, _ in layer.named_parameters()} == {"tiles", "bias"}
    set_linear_weight(layer, -weight)
    assert torch.equal(layer.weight, -weight)
    x = torch.randn(1, 40).bfloat16()
    torch.testing.assert_close(layer(x).float(), (x.float() @ -weight.float().T
                                                  + layer.bias.float()), rtol=1e-2, atol=1e-2)


@needs_kernels
def test_a_tied_weight_is_not_packed():
    """An output layer sharing the embedding's weight keeps it row-major (the embedding
    reads rows of it)."""
    embedding = nn.Embedding(50, 32).bfloat16()
    head = nn.Linear(32, 50, bias=False).bfloat16()
    head.weight = embedding.weight
    model = nn.ModuleDict({"embed": embedding, "head": head})
    use_cpu_linears(model)
    assert type(head) is CpuLinear and head.weight is embedding.weight


def test_switched_off_by_the_environment(monkeypatch, fresh_kernels):
    monkeypatch.setenv(envs.CPU_KERNELS_VAR, "0")
    assert "MOLINK_CPU_KERNELS=0" in fused16.unsupported_reason()
    assert fused16.kernels() is None
    layer = nn.Linear(32, 16).bfloat16()
    use_cpu_linears(nn.Sequential(layer))
    assert type(layer) is CpuLinear  # the PyTorch path
    x = torch.randn(5, 32).bfloat16()
    torch.testing.assert_close(layer(x).float(), F.linear(x.float(), layer.weight.float(),
                                                          layer.bias.float()),
                               rtol=1e-2, atol=1e-2)


@needs_kernels
def test_a_failing_compiler_falls_back_with_a_warning(monkeypatch, fresh_kernels,
                                                      tmp_path_factory):
    broken = tmp_path_factory.mktemp("bin") / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: out of luck' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append  # on the module's logger: whatever other tests did to
    fused16.logger.addHandler(handler)  # propagation or levels above it
    try:
        assert fused16.kernels() is None
    finally:
        fused16.logger.removeHandler(handler)
    assert any("out of luck" in record.getMessage() for record in warnings)
    assert list(fresh_kernels.iterdir()) == []  # no partial library left behind
