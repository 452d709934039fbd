"""bf16 linears on a CPU with native bf16, the weight packed once at load: ``AmxLinear`` on
CPUs with AMX (MoLink's kernel, ``int_amx.matmul16``), ``PackedLinear`` (oneDNN) elsewhere.

On a CPU with native bf16 arithmetic (AVX512-BF16, AMX) PyTorch multiplies bf16 through
oneDNN, but ``F.linear`` hands it the row-major weight on every call. Packed once, at load,
into oneDNN's own layout (``torch.ops.mkldnn._reorder_linear_weight``, what PyTorch's
compiler does for frozen CPU models) the same products run faster in the row counts of a
decode step and no slower in a prefill's. Measured on a Xeon with AMX, 2 threads, bf16
weights out of cache, against ``F.linear``: 2816 x 1024, 1 row 0.40 -> 0.30 ms, 4 rows
0.42 -> 0.28, 16 rows 0.44 -> 0.30, 128 rows 0.77 -> 0.54, 1024 rows 3.1 -> 2.8 (one
thread: 0.74 -> 0.56 at 1 row, 0.77 -> 0.53 at 16). One decode row then reads the weight
as fast as ``fused16``'s kernel (built for CPUs without native bf16) on the same Xeon.

The packed weight is an opaque oneDNN tensor (no storage): ``weight`` reads back a
row-major copy (slow: for code that reads weights directly), ``set_linear_weight`` packs a
new one, ``state_dict`` holds the row-major weight. Tied weights (an embedding shared with
the output layer) stay row-major and shared. Where the op is missing (a PyTorch built
without oneDNN) or fails its self-check, linears stay plain and the reason is logged once;
``MOLINK_CPU_KERNELS=0`` turns packing off too.

Where MoLink's AMX kernel runs (``int_amx.kernels()``: AMX-BF16, Linux, a C compiler) bf16
weights go into its tile layout instead (``AmxLinear``): it reads a decode step's weights
~1.3x faster than oneDNN's packed product (2 threads, a 151M Llama's 48 products: 1 row 10.1
against 14.4 ms, 16 rows 11.4 against 15.0), and is within 0.92-0.99x of it from ~256 rows
on (``int_amx``'s docstring). Same read-back, ``set_weight`` and ``state_dict`` as
``PackedLinear``.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from molink import envs
from molink.model.layers import int_amx
from molink.model.layers.cpu_linear import RowMajorStateDict, shared_storages

logger = logging.getLogger(__name__)

PACKED_DTYPES = (torch.bfloat16,)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 [out, in] CPU weight in oneDNN's layout for products with bf16 activations."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_product(x: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``packed = pack(weight)``; ``x`` bf16 [..., in]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(RowMajorStateDict, nn.Linear):
    """A bf16 ``nn.Linear`` whose weight is kept packed for oneDNN (see the module)."""

    packed: nn.Parameter

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.packed.dtype:
            return _product_in_dtype_of(self, x)
        return packed_product(x, self.packed, self.bias)

    def set_weight(self, weight: torch.Tensor) -> None:
        self.packed = nn.Parameter(pack(weight.to(self.packed.dtype)), requires_grad=False)


def _product_in_dtype_of(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """For a caller computing in another dtype than the packed weight's: the row-major weight
    read back and cast to x's dtype (slow, exact)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


class AmxLinear(RowMajorStateDict, nn.Linear):
    """A bf16 ``nn.Linear`` whose weight is kept in AMX tiles for MoLink's kernel."""

    tiles: nn.Parameter
    amx: int_amx.AmxKernel

    @property
    def weight(self) -> torch.Tensor:
        return int_amx.unpack16(self.tiles, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return _product_in_dtype_of(self, x)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        out = self.amx.matmul16(x.reshape(rows, x.shape[-1]), self.tiles, self.out_features,
                                self._padded_bias())
        return out.reshape(*x.shape[:-1], self.out_features)

    def set_weight(self, weight: torch.Tensor) -> None:
        self.tiles = nn.Parameter(int_amx.pack16(weight.to(torch.bfloat16)),
                                  requires_grad=False)

    def _padded_bias(self) -> torch.Tensor | None:
        """The bias as the kernel adds it (float32, padded), rebuilt when it changes."""
        if self.bias is None:
            return None
        key = (self.bias.data_ptr(), self.bias._version)
        cached = self.__dict__.get("_bias_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_bias_cache"] = (
                key, int_amx.pad_scales(self.bias.detach(), int_amx.BLOCK_PAIR))
        return cached[1]


def amx_kernel() -> int_amx.AmxKernel | None:
    """MoLink's AMX kernel where it runs (``int_amx.kernels``) and CPU kernels are on (read
    on every call, like ``unsupported_reason``), else None."""
    return int_amx.kernels() if envs.cpu_kernels_enabled() else None


def unsupported_reason() -> str | None:
    """Why this PyTorch cannot keep packed bf16 weights, or None when it can."""
    if not envs.cpu_kernels_enabled():
        return f"{envs.CPU_KERNELS_VAR}=0"
    if not torch.backends.mkldnn.is_available():
        return "PyTorch was built without oneDNN"
    return _self_check()


@functools.cache
def _self_check() -> str | None:
    """Odd shapes, one and several rows, against the float32 product of the same weights."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(11, 37, generator=generator).bfloat16()
    bias = torch.randn(11, generator=generator).bfloat16()
    try:
        packed = pack(weight)
        if not torch.equal(packed.to_dense(), weight):
            return "the packed weight does not read back"
        for rows in (1, 3):
            x = torch.randn(rows, 37, generator=generator).bfloat16()
            expected = x.float() @ weight.float().T + bias.float()
            got = packed_product(x, packed, bias).float()
            if not torch.allclose(got, expected, rtol=2 ** -6, atol=2 ** -6):
                return f"the packed product is wrong for {rows} rows"
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        return f"oneDNN's packed linear failed ({error})"
    return None


def pack_linears(model: nn.Module) -> int:
    """Make every plain bf16 CPU ``nn.Linear`` of ``model`` whose weight no other module
    shares an ``AmxLinear`` (where MoLink's AMX kernel runs) or a ``PackedLinear``; how many
    (0, logged once, where packing cannot run)."""
    amx = amx_kernel()
    reason = None if amx is not None else unsupported_reason()
    if reason is not None:
        _log_unpacked(reason)
        return 0
    shared = shared_storages(model)
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        weight = module.weight
        if (weight.dtype not in PACKED_DTYPES or weight.device.type != "cpu"
                or weight.untyped_storage().data_ptr() in shared):
            continue
        del module.weight
        if amx is not None:
            module.__class__ = AmxLinear
            module.amx = amx
            module.set_weight(weight)
        else:
            module.__class__ = PackedLinear
            module.packed = nn.Parameter(pack(weight), requires_grad=False)
        count += 1
    return count


@functools.cache
def _log_unpacked(reason: str) -> None:
    logger.info("bf16 weights multiply through PyTorch's plain product (not packed: %s)",
                reason)
