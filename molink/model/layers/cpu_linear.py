"""CpuLinear: linear layers computed the way a CPU is fast at, same weights, same math.

Two measured weaknesses of PyTorch's CPU matrix products (MKL on an AVX2 EPYC without
native bf16; ``benchmarks/results/cpu_linear.md``), both in the shapes serving hits most:

1. **A few rows** (2 to 64: a decode batch). ``x @ W.T`` runs up to ~3x slower than the
   same product taken as ``(W @ x.T).T`` (1024 x 2816, 4 rows: 4.5 vs 1.5 ms; 16 rows:
   6.8 vs 5.0 ms). One row (a GEMV) and many rows (a prefill) are as fast either way, so
   only 2..64 rows take the other orientation.
2. **16-bit weights on a CPU without 16-bit arithmetic** (x86 without AVX512-BF16 or AMX).
   A bf16 product converts on the fly: fine for a few rows, where the weight's bytes
   dominate (decode reads half of float32's), but a prefill runs ~3.5x slower than float32.
   Up to ``fused16.MAX_ROWS`` rows, MoLink's compiled kernel widens the weight in registers
   and multiplies in float32 (``fused16``: two bytes read per weight). Without it (or for
   more rows), from ``FLOAT32_FROM_TOKENS`` rows on, the weight is widened to float32 and
   the product runs in float32, then rounds back to the activation dtype. Widening goes into a scratch
   buffer kept per thread and reused (a fresh 11 MB tensor per call costs 4x the copy
   itself: new pages are zeroed), a block of rows at a time so the scratch stays small.

Both are exact reorderings of the same float32 products (results differ from ``F.linear``
only by summation order). It is an ``nn.Linear`` (same parameters, same checkpoint names);
``use_cpu_linears`` turns a model's plain linears into it in place.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.layers import fused16

SMALL_BATCH_ROWS = (2, 64)  # the row counts computed as (W @ x.T).T
FLOAT32_FROM_TOKENS = 4  # 16-bit weights: measured crossover between 2 and 4 rows on AVX2
HALF_DTYPES = (torch.bfloat16, torch.float16)
SCRATCH_ELEMENTS = 1 << 22  # float32 scratch per thread and input width: 16 MB

_scratch = threading.local()


class CpuLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if weight.dtype == torch.float32 and x.dtype == torch.float32:
            if not SMALL_BATCH_ROWS[0] <= rows <= SMALL_BATCH_ROWS[1]:
                return F.linear(x, weight, self.bias)
            out = _small_batch(x.reshape(rows, -1), weight)
        elif weight.dtype in HALF_DTYPES and x.dtype in HALF_DTYPES and (
                rows >= FLOAT32_FROM_TOKENS):
            out = _widened(x.reshape(rows, -1).float(), weight.shape[0],
                           lambda scratch, start: scratch.copy_(
                               weight[start:start + scratch.shape[0]]))
        else:
            return F.linear(x, weight, self.bias)
        return self._finish(out, x)

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The float32 product [rows, out]: bias added, in x's dtype and leading shape."""
        if self.bias is not None:
            out += self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


class RowMajorStateDict(nn.Module):
    """For a linear that keeps its weight in another layout and reads it back as
    ``weight``: ``state_dict`` holds the row-major weight under the checkpoint's name."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


class TiledCpuLinear(RowMajorStateDict, CpuLinear):
    """A 16-bit ``CpuLinear`` whose weight is kept packed for the fused kernels
    (``fused16.pack``: tiles of 8 outputs x 16 inputs, one sequential stream): up to
    ``fused16.MAX_ROWS`` rows through the kernel, more rows widened to float32 tile row by
    tile row. ``weight`` reads back a row-major copy (slow: for code that reads weights
    directly); ``set_linear_weight`` writes one; ``state_dict`` holds the row-major weight."""

    tiles: nn.Parameter

    @property
    def weight(self) -> torch.Tensor:
        return fused16.unpack(self.tiles, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        flat = x.reshape(rows, x.shape[-1]).float()
        if rows <= fused16.MAX_ROWS:
            return self._finish(fused16.kernels().matmul(flat, self.tiles, self.out_features), x)
        tiles = self.tiles
        flat, out8 = fused16.pad_input(flat, tiles)

        def widen(scratch: torch.Tensor, start: int) -> torch.Tensor:
            first, count = start // fused16.TILE_ROWS, scratch.shape[0] // fused16.TILE_ROWS
            scratch.view(count, fused16.TILE_ROWS, tiles.shape[1], fused16.TILE_COLUMNS).copy_(
                fused16.unpacked(tiles[first:first + count]))
            return scratch

        out = _widened(flat, out8, widen, row_multiple=fused16.TILE_ROWS)
        return self._finish(out[:, :self.out_features], x)

    def set_weight(self, weight: torch.Tensor) -> None:
        self.tiles.copy_(fused16.pack(weight.to(self.tiles.dtype)))


def set_linear_weight(module: nn.Linear, weight: torch.Tensor) -> None:
    """Overwrite a linear's [out, in] weight, packed (its ``set_weight``) or not (in place,
    no gradient)."""
    with torch.no_grad():
        if hasattr(module, "set_weight"):
            module.set_weight(weight)
        else:
            module.weight.copy_(weight)


def _small_batch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (float32, contiguous), in the orientation fast for its rows."""
    if SMALL_BATCH_ROWS[0] <= x.shape[0] <= SMALL_BATCH_ROWS[1]:
        return torch.mm(weight, x.T).T.contiguous()
    return F.linear(x, weight)


def _widened(x: torch.Tensor, out_features: int, widen, row_multiple: int = 1) -> torch.Tensor:
    """``x @ weight.T`` in float32 for a 16-bit weight of ``out_features`` rows and x's
    columns: ``widen(scratch, start)`` fills a float32 block with the weight's rows from
    ``start`` on (as many as it has) and returns it."""
    in_features = x.shape[1]
    block_rows = max(row_multiple, SCRATCH_ELEMENTS // max(1, in_features)
                     // row_multiple * row_multiple)
    scratch = _scratch_for(in_features, min(block_rows, out_features))
    if out_features <= block_rows:
        return _small_batch(x, widen(scratch[:out_features], 0))
    out = torch.empty(x.shape[0], out_features)
    for start in range(0, out_features, block_rows):
        count = min(block_rows, out_features - start)
        out[:, start:start + count] = _small_batch(x, widen(scratch[:count], start))
    return out


def _scratch_for(in_features: int, rows: int) -> torch.Tensor:
    """This thread's float32 scratch of at least ``rows`` x ``in_features``."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(in_features)
    if buffer is None or buffer.shape[0] < rows:
        # a normal tensor even when first needed under inference mode, so that a later call
        # outside it may still write into it
        with torch.inference_mode(False):
            buffer = buffers[in_features] = torch.empty(rows, in_features)
    return buffer


def use_cpu_linears(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a ``CpuLinear``; how many. Where the fused
    16-bit kernels run (compiled now, once per machine, rather than in the first step), a
    16-bit linear whose weight no other module shares (a tied embedding) is packed for them
    (``TiledCpuLinear``)."""
    shared = shared_storages(model)
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        module.__class__ = CpuLinear
        count += 1
        weight = module.weight
        if (weight.dtype in HALF_DTYPES and weight.device.type == "cpu"
                and weight.untyped_storage().data_ptr() not in shared
                and fused16.kernels() is not None):
            tiles = nn.Parameter(fused16.pack(weight.detach()), requires_grad=False)
            del module.weight
            module.__class__ = TiledCpuLinear
            module.tiles = tiles
    return count


def shared_storages(model: nn.Module) -> set[int]:
    """Storages held by more than one parameter name (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        pointer = param.untyped_storage().data_ptr()
        (shared if pointer in seen else seen).add(pointer)
    return shared
