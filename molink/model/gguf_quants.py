"""GGUF (ggml) weight formats: their block layouts and vectorised torch dequantization.

A quantized matrix ``[rows, cols]`` is stored row by row; each row is ``cols / block_elems``
blocks of ``block_bytes`` bytes, so the raw tensor is ``[rows, row_bytes]`` uint8 and any
row permutation or row concatenation can be done on the bytes without dequantizing.
Layouts (per block; ``f16`` scales are little-endian IEEE half floats)::

    Q8_0  (32 w, 34 B):  d f16 | q int8[32]                       w = d * q
    Q4_0  (32 w, 18 B):  d f16 | qs u8[16]                        w = d * (nibble - 8)
    Q4_1  (32 w, 20 B):  d f16 | m f16 | qs u8[16]                w = d * nibble + m
          nibbles: weights 0..15 are the low nibbles of qs, weights 16..31 the high ones
    Q4_K  (256 w, 144 B): d f16 | dmin f16 | scales u8[12] | qs u8[128]
          8 sub-blocks of 32, each with a 6-bit scale and min:  w = d*sc*nibble - dmin*mn
          qs in 4 chunks of 32 bytes: low nibbles = sub-block 2i, high nibbles = 2i+1
    Q6_K  (256 w, 210 B): ql u8[128] | qh u8[64] | scales int8[16] | d f16
          2 halves of 128; 16 sub-blocks of 16 weights:  w = d * sc * (q6 - 32)

F32, F16 and BF16 are plain arrays (one "block" per element).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from molink.model.layers.int_linear import IntWeight

F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 14, 30


class Format(NamedTuple):
    name: str
    block_elems: int
    block_bytes: int


FORMATS = {
    F32: Format("F32", 1, 4), F16: Format("F16", 1, 2), BF16: Format("BF16", 1, 2),
    Q4_0: Format("Q4_0", 32, 18), Q4_1: Format("Q4_1", 32, 20), Q8_0: Format("Q8_0", 32, 34),
    Q4_K: Format("Q4_K", 256, 144), Q6_K: Format("Q6_K", 256, 210),
}
PLAIN_TYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
QUANTIZED_TYPES = frozenset(FORMATS) - frozenset(PLAIN_TYPES)


def format_of(ggml_type: int) -> Format:
    if ggml_type not in FORMATS:
        raise ValueError(f"GGUF tensor type {ggml_type} is not supported (supported: "
                         f"{', '.join(f.name for f in FORMATS.values())})")
    return FORMATS[ggml_type]


def row_bytes(ggml_type: int, cols: int) -> int:
    fmt = format_of(ggml_type)
    if cols % fmt.block_elems:
        raise ValueError(f"{fmt.name} rows must hold a multiple of {fmt.block_elems} values, "
                         f"not {cols}")
    return cols // fmt.block_elems * fmt.block_bytes


def dequantize(raw: torch.Tensor, ggml_type: int, cols: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rows, row_bytes] uint8 -> [rows, cols] ``dtype`` (computed in float32)."""
    if ggml_type in PLAIN_TYPES:
        return raw.contiguous().view(PLAIN_TYPES[ggml_type]).reshape(-1, cols).to(dtype)
    groups = _groups(raw, ggml_type)
    values = groups.codes.float() * groups.scales.unsqueeze(-1)
    if groups.zeros is not None:
        values = values + groups.zeros.unsqueeze(-1)
    return values.reshape(-1, cols).to(dtype)


def int_weight(raw: torch.Tensor, ggml_type: int, cols: int) -> IntWeight:
    """A quantized [rows, row_bytes] tensor as ``IntWeight`` row groups (signed codes, a
    float32 scale and zero per group, as ``INT_FORMATS`` says), for the integer kernels: the
    same weight as ``dequantize`` up to float32 rounding of the zeros (Q4_1, Q4_K: unsigned
    nibbles ``u`` become ``u - 8`` and the zero takes ``8 * scale``)."""
    groups, fmt = _groups(raw, ggml_type), INT_FORMATS[ggml_type]
    rows = raw.shape[0]
    codes, scales, zeros = groups.codes, groups.scales, groups.zeros
    if groups.offset:  # unsigned nibbles (0..15) fit int8: shift them there, no wrap
        codes = codes.to(torch.int8) - groups.offset
        shift = groups.offset * scales
        zeros = shift if zeros is None else zeros + shift
    return IntWeight(
        codes=codes.to(torch.int8).reshape(rows, cols),
        scales=scales.reshape(rows, -1).t().contiguous(),
        zeros=None if zeros is None else zeros.reshape(rows, -1).t().contiguous(),
        group_size=fmt.group_size, bits=fmt.bits)


class _Groups(NamedTuple):
    """Blocks as ``codes * scale + zero`` per group: codes [N, G, g] (integers), scales and
    zeros [N, G] float32 (zeros None: none); ``offset``: what makes the codes signed."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    offset: int = 0


def _groups(raw: torch.Tensor, ggml_type: int) -> _Groups:
    fmt = format_of(ggml_type)
    blocks = raw.reshape(-1, fmt.block_bytes)  # [rows * blocks_per_row, block_bytes]
    return _DECODERS[ggml_type](blocks)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 at byte ``start`` of every block -> [N, 1] float32."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[N, 16] bytes -> [N, 1, 32] (0..15): low nibbles first, then high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).unsqueeze(1)


def _q8_0(blocks: torch.Tensor) -> _Groups:
    return _Groups(blocks[:, 2:].contiguous().view(torch.int8).unsqueeze(1), _f16(blocks, 0),
                   None)


def _q4_0(blocks: torch.Tensor) -> _Groups:
    return _Groups(_nibbles(blocks[:, 2:]).to(torch.int8) - 8, _f16(blocks, 0), None)


def _q4_1(blocks: torch.Tensor) -> _Groups:
    return _Groups(_nibbles(blocks[:, 4:]), _f16(blocks, 0), _f16(blocks, 2), offset=8)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, each [N, 8] float32.

    Sub-blocks 0..3: low 6 bits of bytes 0..3 (scales) and 4..7 (mins). Sub-blocks 4..7: low
    nibble (scale) / high nibble (min) of bytes 8..11, with 2 high bits taken from the top
    bits of bytes 0..3 (scales) and 4..7 (mins).
    """
    packed = packed.int()
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([low & 63, (high & 0x0F) | ((low >> 6) << 4)], dim=-1)
    mins = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def _q4_k(blocks: torch.Tensor) -> _Groups:
    num_blocks = blocks.shape[0]
    scales, mins = _k_scales_mins(blocks[:, 4:16])  # [N, 8] each
    qs = blocks[:, 16:].reshape(num_blocks, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(num_blocks, 8, 32)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # [N, 1]
    return _Groups(q, d * scales, -(dmin * mins), offset=8)  # d*sc*q - dmin*mn


def _q6_k(blocks: torch.Tensor) -> _Groups:
    num_blocks = blocks.shape[0]
    ql = blocks[:, :128].reshape(num_blocks, 2, 64).int()  # per half
    qh = blocks[:, 128:192].reshape(num_blocks, 2, 32).int()
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [N, 16]
    low = torch.cat([ql & 0x0F, ql >> 4], dim=-1)  # [N, 2, 128]
    high = torch.cat([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)  # [N, 2, 128]
    q = (low | (high << 4)) - 32
    # 16 sub-blocks of 16 weights, in order
    return _Groups(q.reshape(num_blocks, 16, 16), _f16(blocks, 208) * scales, None)


_DECODERS = {Q8_0: _q8_0, Q4_0: _q4_0, Q4_1: _q4_1, Q4_K: _q4_k, Q6_K: _q6_k}


class IntFormat(NamedTuple):
    """A quantized type as ``int_weight`` gives it to the integer kernels."""

    bits: int  # of the codes as held (Q6_K's 6-bit codes fit 8)
    group_size: int
    symmetric: bool  # no zero (GGUF's min) per group


INT_FORMATS = {Q8_0: IntFormat(8, 32, True), Q4_0: IntFormat(4, 32, True),
               Q4_1: IntFormat(4, 32, False), Q4_K: IntFormat(4, 32, False),
               Q6_K: IntFormat(8, 16, True)}
FOUR_BIT_TYPES = frozenset(t for t, f in INT_FORMATS.items() if f.bits == 4)
