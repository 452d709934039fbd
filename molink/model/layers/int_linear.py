"""IntLinear: a linear layer whose weight stays as 4- or 8-bit integers with group scales.

The weight is one or more row blocks (a fused q | k | v or gate | up). Block ``b`` means::

    W[n, perm[k]] = codes[n, k] * scales[k // group_size, n] + zeros[k // group_size, n]

with signed codes (4-bit: -8..7, 8-bit: -128..127), scales and zeros in the model dtype
(no zeros: symmetric) and ``perm`` (GPTQ act-order) the input order that makes each group
contiguous; ``perm`` absent: the identity. Parts that share a layout and need no ``perm``
are merged into one block when filled, so one kernel call covers q | k | v.

How a block is stored and multiplied is chosen once, when it is filled:

    kind       where                                              matmul
    int4pack   CPU; bf16; 4-bit; rows % 16 == 0; group 32..256    aten._weight_int4pack_mm_for_cpu
    int8amx    CPU with AMX; bf16; 8-bit; symmetric; one group    int_amx.c (``int_amx``)
               per row
    groupamx   CPU with AMX; bf16; 4/8-bit; groups of 32k         int_amx.c
    int8pack   CPU; 8-bit; symmetric; one group per row           aten._weight_int8pack_mm
    nibbles    4-bit elsewhere: two codes a byte (even k low)     dequantize, then F.linear
    bytes      8-bit elsewhere: one code a byte                   dequantize, then F.linear

Where AMX is there (``int_amx.kernels()``), bf16 blocks of 4- or 8-bit codes whose groups
span whole 32-input blocks take MoLink's AMX kernel, which reads the weight once for up to 64
rows (PyTorch's int8 and int4 kernels: once per row); their codes are stored in that kernel's
block layout, group scales (and zeros) in bf16 and int8's per-output scales in float32, in
its order.

Why bf16 only for int4: PyTorch vectorises that kernel for bf16 alone; its fp32 / fp16 path is
a scalar loop, measured 8x slower than dequantize-then-matmul at 16 tokens (1024x4096).
The int8 kernel is vectorised for all three dtypes, but in fp32 / fp16 it loses to the
fallback above ``SCALAR_INT8_MAX_TOKENS`` tokens, so there forward picks per call (same
storage either way). It computes one row at a time, so on a CPU with native bf16 (AVX512-BF16,
AMX) a bf16 prefill of ``INT8_DEQUANTIZE_FROM_TOKENS`` rows or more dequantizes and takes
PyTorch's bf16 product instead (Xeon with AMX, 2816 x 1024, 2 threads: 128 rows 5.3 -> 1.7
ms, 512 rows 20 -> 2.5; 24 rows 1.19 -> 1.06, one thread 2.27 -> 1.99; 16 rows 0.81 against
1.08, so fewer stay on the kernel).

PyTorch's int4 kernel computes ``(q - 8) * scale + zero`` per group with ``q`` in 0..15 and
scale/zero interleaved as ``[K / group, N, 2]`` in the activation dtype: exactly our codes.
Buffers, not parameters, so ``next(model.parameters()).dtype`` stays the model dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.cpu_features import has_native_bf16
from molink.model.layers import int_amx

INT8_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT4_KERNEL_DTYPES = (torch.bfloat16,)
SCALAR_INT8_MAX_TOKENS = 4  # fp32 / fp16: measured break-even between 4 and 8 tokens
INT8_DEQUANTIZE_FROM_TOKENS = 24  # bf16 with native bf16: measured break-even 16-24 tokens
INT4_KERNEL_GROUPS = (256, 128, 64, 32)
_EYE_CHUNK = 1024  # input features dequantized per kernel call in ``weight_as``


class IntWeight(NamedTuple):
    """One row block of a weight, as converters and quantizers produce it (see module doc)."""

    codes: torch.Tensor  # [rows, in_features] int8, signed codes
    scales: torch.Tensor  # [num_groups, rows] float
    zeros: torch.Tensor | None  # [num_groups, rows] float; None: symmetric
    group_size: int  # in_features % group_size == 0
    bits: int  # 4 | 8
    perm: torch.Tensor | None = None  # [in_features] int64; None: the identity

    def dequantize(self) -> torch.Tensor:
        """[rows, in_features] float32, in the checkpoint's input order."""
        permuted = dequantize_groups(self.codes, self.scales, self.zeros, self.group_size)
        return unpermute(permuted, self.perm)


class _Block(NamedTuple):
    kind: str  # int8amx | groupamx | int4pack | int8pack | nibbles | bytes
    rows: int
    group_size: int
    permuted: bool
    bits: int


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    """``codes * scale + zero`` per group, in float32: [rows, K] codes -> [rows, K]."""
    rows, cols = codes.shape
    grouped = codes.float().view(rows, cols // group_size, group_size)
    weight = grouped * scales.float().t().unsqueeze(-1)
    if zeros is not None:
        weight = weight + zeros.float().t().unsqueeze(-1)
    return weight.view(rows, cols)


def unpermute(weight: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Columns back in checkpoint order: column ``j`` of ``weight`` is input ``perm[j]``."""
    if perm is None:
        return weight
    out = torch.empty_like(weight)
    out[:, perm] = weight
    return out


class IntLinear(nn.Module):
    """``y = x @ W.T + b`` with W kept as integer blocks (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.blocks: list[_Block] = []
        self.weight_dtype = torch.float32  # what scales are kept in (the model dtype)
        # bf16 rows from which int8pack dequantizes instead (None: never; see the module doc)
        self.int8_dequantize_from: int | None = None
        self.amx: int_amx.AmxKernel | None = None  # the kernel of the *amx kinds

    def set_weight(self, parts: list[IntWeight], dtype: torch.dtype, device: torch.device,
                   use_kernels: bool = True) -> None:
        """Store ``parts`` (row ranges, in order) on ``device``; scales in ``dtype``."""
        merged = merge_parts(parts)
        rows = sum(part.codes.shape[0] for part in merged)
        if rows != self.out_features or any(p.codes.shape[1] != self.in_features for p in merged):
            raise ValueError(f"quantized weight is {rows}x{merged[0].codes.shape[1]}, the layer "
                             f"expects {self.out_features}x{self.in_features}")
        self.weight_dtype, self.blocks = dtype, []
        self.int8_dequantize_from = INT8_DEQUANTIZE_FROM_TOKENS if has_native_bf16() else None
        for i, part in enumerate(merged):
            self.blocks.append(self._store(i, part, dtype, device, use_kernels))

    def _store(self, i: int, part: IntWeight, dtype: torch.dtype, device: torch.device,
               use_kernels: bool) -> _Block:
        kind = choose_kind(part, dtype, device, use_kernels)
        codes, group_size = part.codes.to(device), part.group_size
        scales = part.scales.to(device=device, dtype=dtype)
        zeros = None if part.zeros is None else part.zeros.to(device=device, dtype=dtype)
        if kind in ("int8amx", "groupamx"):
            self.amx = int_amx.kernels()
        if kind == "int8pack":
            self.register_buffer(f"qweight{i}", codes.contiguous())
            self.register_buffer(f"scales{i}", scales[0].contiguous())  # [rows]
        elif kind == "int8amx":
            self.register_buffer(f"qweight{i}", int_amx.pack(codes))
            self.register_buffer(f"scales{i}", int_amx.pad_scales(scales[0]))  # [rows16] fp32
        elif kind == "groupamx":
            self.register_buffer(f"qweight{i}", int_amx.pack(codes, part.bits))
            self.register_buffer(f"scales{i}", int_amx.group_values(scales))
            if zeros is not None:
                self.register_buffer(f"zeros{i}", int_amx.group_values(zeros))
        else:
            if kind == "int4pack" and group_size not in INT4_KERNEL_GROUPS:
                group_size = kernel_group(group_size)  # a whole row: repeat its scale
                repeats = part.group_size // group_size
                scales = scales.repeat_interleave(repeats, 0)
                zeros = None if zeros is None else zeros.repeat_interleave(repeats, 0)
            packed = pack_codes(codes, kind)
            self.register_buffer(f"qweight{i}", packed)
            zeros = torch.zeros_like(scales) if zeros is None else zeros
            self.register_buffer(f"scales{i}", torch.stack([scales, zeros], -1).contiguous())
        if part.perm is not None:
            self.register_buffer(f"perm{i}", part.perm.to(device=device, dtype=torch.int32))
        return _Block(kind, codes.shape[0], group_size, part.perm is not None, part.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [T, in]
        outs = [self._block_matmul(i, flat) for i in range(len(self.blocks))]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # [T, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _block_matmul(self, i: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[i]
        if block.permuted:
            x = x.index_select(-1, getattr(self, f"perm{i}"))
        qweight, scales = getattr(self, f"qweight{i}"), getattr(self, f"scales{i}")
        if x.shape[0] == 0:
            return x.new_zeros(0, block.rows)
        if block.kind == "int8amx" and x.dtype == torch.bfloat16:
            return self.amx.matmul(x, qweight, block.rows, scales)
        if block.kind == "groupamx" and x.dtype == torch.bfloat16:
            return self.amx.matmul(x, qweight, block.rows, scales, block.bits, block.group_size,
                                   getattr(self, f"zeros{i}", None))
        if block.kind == "int4pack":
            a = x.to(self.weight_dtype).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, qweight, block.group_size, scales)
            return y.to(x.dtype)
        if block.kind == "int8pack" and (
                x.shape[0] <= SCALAR_INT8_MAX_TOKENS or x.dtype == torch.bfloat16 and (
                    self.int8_dequantize_from is None
                    or x.shape[0] < self.int8_dequantize_from)):
            a = x.to(self.weight_dtype).contiguous()
            return torch.ops.aten._weight_int8pack_mm(a, qweight, scales).to(x.dtype)
        return F.linear(x, self._permuted_weight(i, x.dtype))  # the plain fallback

    def _permuted_weight(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """Block ``i`` dequantized, columns in its ``perm`` order: [rows, in]."""
        block = self.blocks[i]
        qweight, scales = getattr(self, f"qweight{i}"), getattr(self, f"scales{i}")
        if block.kind == "int4pack":
            return _int4pack_weight(qweight, scales, block.group_size, self.in_features).to(dtype)
        if block.kind == "groupamx":  # 8-bit: the weight each block widens to; 4-bit: the
            # kernel multiplies this weight before its rounding to ``dtype``
            codes = int_amx.unpack(qweight, block.rows, self.in_features, block.bits)
            zeros = getattr(self, f"zeros{i}", None)
            return dequantize_groups(
                codes, int_amx.ungroup_values(scales, block.rows),
                None if zeros is None else int_amx.ungroup_values(zeros, block.rows),
                block.group_size).to(dtype)
        if block.kind == "int8amx":  # codes back in rows; scales as kept, in the model dtype
            qweight = int_amx.unpack(qweight, block.rows, self.in_features)
            scales = scales[:block.rows].to(self.weight_dtype)
        if block.kind in ("int8pack", "int8amx"):
            if scales.dtype == dtype:  # one pass (codes are exact in any float dtype): the
                return qweight * scales.unsqueeze(-1)  # same rounding, half the time in bf16
            return (qweight.float() * scales.float().unsqueeze(-1)).to(dtype)
        codes = unpack_nibbles(qweight) if block.kind == "nibbles" else qweight
        return dequantize_groups(codes, scales[..., 0], scales[..., 1], block.group_size).to(dtype)

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """[out_features, in_features] dequantized, exactly as forward uses it."""
        parts = []
        for i, block in enumerate(self.blocks):
            weight = self._permuted_weight(i, dtype)
            parts.append(unpermute(weight, getattr(self, f"perm{i}") if block.permuted else None))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``.weight`` directly (slow path)."""
        return self.weight_as(self.weight_dtype)

    def extra_repr(self) -> str:
        kinds = ",".join(block.kind for block in self.blocks)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocks={kinds or 'empty'}")


def merge_parts(parts: list[IntWeight]) -> list[IntWeight]:
    """Consecutive parts of one layout and no ``perm`` become one (rows stacked)."""
    merged: list[IntWeight] = []
    for part in parts:
        last = merged[-1] if merged else None
        if (last is not None and last.perm is None and part.perm is None
                and (last.bits, last.group_size) == (part.bits, part.group_size)
                and (last.zeros is None) == (part.zeros is None)):
            zeros = None if part.zeros is None else torch.cat([last.zeros, part.zeros], 1)
            merged[-1] = last._replace(codes=torch.cat([last.codes, part.codes]),
                                       scales=torch.cat([last.scales, part.scales], 1),
                                       zeros=zeros)
        else:
            merged.append(part)
    return merged


def kernel_group(group_size: int) -> int | None:
    """The int4 kernel's group size for ``group_size`` (None: none fits)."""
    return next((g for g in INT4_KERNEL_GROUPS if group_size % g == 0), None)


def choose_kind(part: IntWeight, dtype: torch.dtype, device: torch.device,
                use_kernels: bool) -> str:
    rows, cols = part.codes.shape
    return kind_for(rows, cols, part.bits, part.group_size, part.zeros is None, dtype,
                    device if use_kernels else torch.device("meta"))


def kind_for(rows: int, cols: int, bits: int, group_size: int, symmetric: bool,
             dtype: torch.dtype, device: torch.device) -> str:
    """How a block of this shape and format is stored and multiplied (the module doc's
    table); ``device`` other than the CPU: the plain fallbacks."""
    on_cpu = device.type == "cpu"
    per_row_int8 = bits == 8 and symmetric and group_size == cols
    if on_cpu and dtype == torch.bfloat16 and int_amx.kernels() is not None:
        if per_row_int8:
            return "int8amx"
        if int_amx.supports(bits, group_size):
            return "groupamx"
    if bits == 4:
        fits = rows % 16 == 0 and kernel_group(group_size) is not None
        if on_cpu and dtype in INT4_KERNEL_DTYPES and fits:
            return "int4pack"
        return "nibbles" if cols % 2 == 0 else "bytes"
    if on_cpu and dtype in INT8_KERNEL_DTYPES and per_row_int8:
        return "int8pack"
    return "bytes"


KERNEL_KINDS = frozenset({"int8amx", "groupamx", "int4pack", "int8pack"})


def stored_bytes(kind: str, rows: int, cols: int, bits: int, group_size: int,
                 symmetric: bool, dtype: torch.dtype) -> int:
    """Bytes ``IntLinear`` keeps for a block of ``kind`` (codes, scales, zeros), as ``_store``
    lays them out."""
    groups = cols // group_size
    scale_bytes = dtype.itemsize
    if kind in ("int8amx", "groupamx"):
        out16, in32 = -(-rows // 16) * 16, -(-cols // 32) * 32
        codes = out16 * in32 * bits // 8
        if kind == "int8amx":
            return codes + out16 * 4  # float32 scales (pad_scales)
        return codes + groups * out16 * 2 * (1 if symmetric else 2)  # bf16 (group_values)
    if kind == "int8pack":
        return rows * cols + rows * scale_bytes
    if kind == "int4pack":
        groups = cols // kernel_group(group_size)
        return rows * cols // 2 + groups * rows * 2 * scale_bytes  # scale and zero each
    codes = rows * cols // 2 if kind == "nibbles" else rows * cols
    return codes + groups * rows * 2 * scale_bytes


def pack_codes(codes: torch.Tensor, kind: str) -> torch.Tensor:
    """[rows, K] signed codes -> the stored form of ``kind``."""
    if kind == "int4pack":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes.int() + 8), 1)
    if kind == "nibbles":
        unsigned = (codes + 8).to(torch.uint8)  # 0..15
        return unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)  # [rows, K / 2]
    return codes.to(torch.int8).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[rows, K / 2] uint8 -> [rows, K] int8 signed codes."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], -1).flatten(1).to(torch.int8) - 8


def _int4pack_weight(qweight: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                     in_features: int) -> torch.Tensor:
    """The kernel's own weight, read back through the kernel: ``I @ W.T`` for one-hot rows
    (the packed layout is ISA-specific, so it is never unpacked by hand). [rows, in]."""
    dtype = scale_zero.dtype
    columns = []
    for start in range(0, in_features, _EYE_CHUNK):
        size = min(_EYE_CHUNK, in_features - start)
        eye = torch.zeros(size, in_features, dtype=dtype, device=qweight.device)
        eye[torch.arange(size), torch.arange(start, start + size)] = 1
        columns.append(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, qweight, group_size,
                                                                  scale_zero))  # [size, rows]
    return torch.cat(columns).t()
