"""4-, 8- and 16-bit weights times bf16 activations with AMX: ``int_amx.c``, compiled on first
use.

PyTorch's CPU int8 and int4 weight-only kernels (``aten._weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``) compute one activation row at a time, so the rows of a
decode batch or a prefill each cost a pass over the weight: on a Xeon with AMX (2816 x 1024,
one thread, weights out of cache) 16 rows take 1.83 ms (int8) and 1.27 ms (int4) against
0.61 for bf16 weights, and a 256-row prefill 18.7 ms in int4 against 1.4. ``int_amx.c``
reads each 16 x 32 block of codes once per call, widens it to bf16 in registers and lets
AMX multiply it with up to 64 rows: int8 1-23 rows in 0.33-0.36 ms, half the bf16 product's
time, as it reads half the bytes; int4 16 rows 0.34 ms, 256 rows 2.5 ms, but one row 0.27
ms against PyTorch's 0.23.

Two formats (``IntLinear`` kinds):

- ``int8amx``: int8, symmetric, one scale per output: codes widened exactly, the scale
  applied to the float32 sums (PyTorch's int8 kernel's arithmetic up to summation order);
- ``groupamx``: 4- or 8-bit codes with a scale (and optionally a zero) per group of a
  multiple of 32 inputs. 8-bit: each block widened to ``code * scale + zero`` in float32 and
  rounded to bf16, exactly the weight ``int_linear`` dequantizes to, then multiplied. 4-bit:
  the codes themselves (looked up as bf16, exact) multiplied, each group's float32 sums
  times its scale plus the row's sum over the group times its zero: the exact weight's
  product, and less widening work per weight (one row: 0.27 ms, widened like 8-bit
  0.31).

bf16 weights (``matmul16``, for ``packed_linear.AmxLinear``) are stored in the same tile
layout and loaded straight into AMX's tiles, two 16-output blocks against 32 rows at a
time. oneDNN's packed bf16 product reads a decode step's weights at ~20 GB/s on a Xeon with
AMX (2 threads, the 48 products of a 151M Llama's 12 layers, 287 MB, out of cache); this
kernel at ~27, where ``torch.mv`` over float32 reads 29-31: 1 row 14.4 -> 10.1 ms, 16 rows
15.0 -> 11.4, 33 rows 17.7 -> 13.8, 128 rows 28.4 -> 24.1; from ~256 rows on, where both are
bound by AMX's arithmetic, 0.92-0.99x oneDNN's speed.

Only on CPUs with AMX-BF16 (``amx_bf16``, ``amx_tile``, ``avx512_bf16`` in the CPU's flags)
and Linux's permission for AMX state; elsewhere, or where compiling, loading or the
self-check fails, the layers stay on PyTorch's kernels and the reason is logged once.
``MOLINK_CPU_KERNELS=0`` turns it off too. Compiled by ``fused16.compiled`` like the 16-bit
kernels (same cache directory, same compiler).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from molink import envs
from molink.model.cpu_features import cpu_flags
from molink.model.layers import fused16

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int_amx.c")
MAX_ROWS = 64  # rows per kernel call (four AMX accumulator tiles); more rows: several calls
BLOCK_OUT, BLOCK_IN = 16, 32  # one AMX B tile: 16 outputs x 32 inputs
REQUIRED_FLAGS = frozenset({"amx_bf16", "amx_tile", "avx512_bf16", "avx512bw"})
BLOCK_PAIR = 2 * BLOCK_OUT  # bf16 weights: two B tiles (32 outputs) per pass
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
             ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_int]
_ARGTYPES_16 = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]


class AmxKernel:
    """The compiled kernel: ``matmul(x, tiles, out_features, scales, ...)`` = ``x @ W.T`` in
    bf16 for ``tiles = pack(codes, bits)`` and scales (and zeros) as ``pad_scales`` or
    ``group_values`` give them; ``matmul16(x, tiles, out_features, bias)`` for bf16 weights
    ``tiles = pack16(weight)``."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._gemm = library.molink_gemm_amx
        self._gemm.argtypes, self._gemm.restype = _ARGTYPES, None
        self._gemm16 = library.molink_gemm_amx16
        self._gemm16.argtypes, self._gemm16.restype = _ARGTYPES_16, None
        self._group_sums = library.molink_group_sums
        self._group_sums.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_void_p]
        self._group_sums.restype = None

    def __deepcopy__(self, memo) -> AmxKernel:
        return self  # one loaded library per process: a copied layer shares it

    def __reduce__(self):
        return kernels, ()  # a pickled layer finds the kernel of the process that loads it

    def matmul(self, x: torch.Tensor, tiles: torch.Tensor, out_features: int,
               scales: torch.Tensor, bits: int = 8, group_size: int = 0,
               zeros: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` bf16 [rows, in] -> bf16 [rows, out_features]. ``group_size`` 0: int8 with
        ``pad_scales`` scales applied to the sums; else groups of that many inputs (a multiple
        of 32) with ``group_values`` scales and zeros (None: symmetric)."""
        blocks_out, blocks_in = tiles.shape[0], tiles.shape[1]
        in32, out16 = blocks_in * BLOCK_IN, blocks_out * BLOCK_OUT
        if not supports(bits, group_size):
            raise ValueError(f"no AMX kernel for {bits}-bit codes in groups of {group_size}")
        wanted = torch.bfloat16 if group_size else torch.float32  # group_values / pad_scales
        if any(v is not None and v.dtype != wanted for v in (scales, zeros)):
            raise ValueError(f"{'grouped' if group_size else 'per-output'} scales and zeros "
                             f"are {wanted} here, not {scales.dtype}")
        x = _padded_input(x, in32)
        rows = x.shape[0]
        out = torch.empty(rows, out16, dtype=torch.bfloat16)
        threads = torch.get_num_threads()
        zeros_pointer = xsums = None
        if zeros is not None:
            zeros_pointer = zeros.data_ptr()
            if bits == 4:  # each row's sum over each group, for the zeros' share
                xsums = self.group_sums(x, group_size)
        for start in range(0, rows, MAX_ROWS):
            count = min(MAX_ROWS, rows - start)
            self._gemm(x[start].data_ptr(), count, tiles.data_ptr(), in32, out16, bits,
                       group_size, scales.data_ptr(), zeros_pointer,
                       None if xsums is None else xsums[start].data_ptr(),
                       out[start].data_ptr(), threads)
        return out if out16 == out_features else out[:, :out_features]

    def group_sums(self, x: torch.Tensor, group_size: int) -> torch.Tensor:
        """float32 [rows, in / group_size]: each row of ``x`` (bf16 [rows, in], contiguous,
        ``in`` a multiple of ``group_size``, itself of 32) summed over each group, as the
        decode-layers loop sums them."""
        rows, columns = x.shape
        out = torch.empty(rows, columns // group_size)
        if rows:
            self._group_sums(x.data_ptr(), rows, columns, group_size, out.data_ptr())
        return out

    def matmul16(self, x: torch.Tensor, tiles: torch.Tensor, out_features: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` bf16 [rows, in] -> bf16 [rows, out_features] for ``tiles = pack16(weight)``;
        ``bias``: float32, zero-padded to ``tiles``' outputs (``pad_scales``), or None. The
        products exact, the sums (and the bias) float32, one rounding to bf16."""
        out32, in32 = tiles.shape[0] * BLOCK_OUT, tiles.shape[1] * BLOCK_IN
        if x.shape[-1] != in32 or x.dtype != torch.bfloat16 or not x.is_contiguous():
            x = _padded_input(x, in32)  # checked and copied only where needed (per layer)
        if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out32,)
                                 or not bias.is_contiguous()):
            raise ValueError(f"the bias must be float32 [{out32}] (pad_scales), not "
                             f"{bias.dtype} {tuple(bias.shape)}")
        rows = x.shape[0]
        out = torch.empty(rows, out32, dtype=torch.bfloat16)
        if rows:
            self._gemm16(x.data_ptr(), rows, tiles.data_ptr(), in32, out32,
                         None if bias is None else bias.data_ptr(), out.data_ptr(),
                         torch.get_num_threads())
        return out if out32 == out_features else out[:, :out_features]


def _padded_input(x: torch.Tensor, in32: int) -> torch.Tensor:
    """``x`` [rows, in] bf16, zero-padded to the tiles' ``in32`` columns, contiguous."""
    in_features = x.shape[-1]
    if not in32 - BLOCK_IN < in_features <= in32:
        raise ValueError(f"x of {in_features} columns against {in32}-column tiles")
    if x.dtype != torch.bfloat16:
        raise ValueError(f"the AMX kernel takes bf16 activations, not {x.dtype}")
    return (x if in_features == in32 else F.pad(x, (0, in32 - in_features))).contiguous()


def supports(bits: int, group_size: int) -> bool:
    """Whether the kernel takes ``bits``-bit codes in groups of ``group_size`` inputs (0: int8
    with one scale per output, applied to the sums)."""
    return bits in (4, 8) and group_size % BLOCK_IN == 0 and (group_size > 0 or bits == 8)


def pack(codes: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Signed codes [out, in] as the kernel reads them: [out16 / 16, in32 / 32, 16, 32 * bits
    / 8], zero-padded to whole blocks. Row ``p`` of a block holds, for each of its 16 outputs
    ``n``, the codes of inputs ``2p`` and ``2p + 1`` at positions ``2n`` and ``2n + 1`` (AMX's
    pair-interleaved B tile); 4-bit: byte ``j`` holds position ``j`` plus 8 in its low
    nibble and position ``j + 16`` plus 8 in its high one."""
    out_features, in_features = codes.shape
    padded = F.pad(codes, (0, -in_features % BLOCK_IN, 0, -out_features % BLOCK_OUT))
    out16, in32 = padded.shape
    blocks = padded.view(out16 // BLOCK_OUT, BLOCK_OUT, in32 // BLOCK_IN, BLOCK_IN // 2, 2)
    tiles = blocks.permute(0, 2, 3, 1, 4).reshape(out16 // BLOCK_OUT, in32 // BLOCK_IN,
                                                  BLOCK_IN // 2, 2 * BLOCK_OUT)
    if bits == 8:
        return tiles.contiguous()
    unsigned = (tiles + 8).to(torch.uint8)  # 0..15 (padding: 8, a zero code)
    return (unsigned[..., :BLOCK_OUT] | (unsigned[..., BLOCK_OUT:] << 4)).contiguous()


def unpack(tiles: torch.Tensor, out_features: int, in_features: int,
           bits: int = 8) -> torch.Tensor:
    """``pack``'s inverse: the signed [out_features, in_features] codes (a copy)."""
    if bits == 4:
        low, high = (tiles & 0x0F).to(torch.int8) - 8, (tiles >> 4).to(torch.int8) - 8
        tiles = torch.cat([low, high], dim=-1)
    blocks_out, blocks_in = tiles.shape[0], tiles.shape[1]
    codes = tiles.reshape(blocks_out, blocks_in, BLOCK_IN // 2, BLOCK_OUT, 2).permute(
        0, 3, 1, 2, 4)
    return codes.reshape(blocks_out * BLOCK_OUT, blocks_in * BLOCK_IN)[
        :out_features, :in_features].contiguous()


def pack16(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 [out, in] weight as ``matmul16`` reads it: ``pack``'s 8-bit layout of its
    16-bit values, outputs zero-padded to whole pairs of blocks (32), bf16."""
    padded = F.pad(weight.detach(), (0, 0, 0, -weight.shape[0] % BLOCK_PAIR))
    return pack(padded.view(torch.int16)).view(torch.bfloat16)


def unpack16(tiles: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """``pack16``'s inverse: the bf16 [out_features, in_features] weight (a copy)."""
    return unpack(tiles.view(torch.int16), out_features, in_features).view(torch.bfloat16)


def pad_scales(scales: torch.Tensor, block: int = BLOCK_OUT) -> torch.Tensor:
    """[out] scales (or a bias) as the kernel reads them: float32, zero-padded to whole
    ``block``-output blocks (``BLOCK_PAIR`` for ``matmul16``'s bias)."""
    return F.pad(scales.float(), (0, -scales.shape[0] % block)).contiguous()


def group_values(values: torch.Tensor) -> torch.Tensor:
    """[groups, out] group scales or zeros as the kernel reads them: bf16 [groups, out16],
    zero-padded to whole 16-output blocks (4- and 8-bit alike; the 8-bit path pairs them
    while widening). Values already in bf16 (``IntLinear`` keeps them in the model dtype)
    are kept exactly."""
    return F.pad(values.to(torch.bfloat16), (0, -values.shape[1] % BLOCK_OUT)).contiguous()


def ungroup_values(stored: torch.Tensor, out_features: int) -> torch.Tensor:
    """``group_values``' inverse: [groups, out_features] float32."""
    return stored[:, :out_features].float()


def unsupported_reason() -> str | None:
    """Why this machine cannot run the kernel, or None when it can (given a compiler)."""
    if not envs.cpu_kernels_enabled():
        return f"{envs.CPU_KERNELS_VAR}=0"
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not x86-64 Linux ({platform.system()} {platform.machine()})"
    flags = cpu_flags()
    missing = sorted(REQUIRED_FLAGS - (flags or frozenset()))
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if fused16.compiler() is None:
        return fused16.NO_COMPILER
    return None


@functools.cache
def kernels() -> AmxKernel | None:
    """The kernel, compiled (once per machine) and loaded; None where it cannot run."""
    reason = unsupported_reason()
    if reason is None:
        try:
            path = fused16.compiled(SOURCE)
            library = ctypes.CDLL(str(path))
            if library.molink_amx_init() != 1:
                reason = "Linux refused AMX state (arch_prctl)"
            else:
                kernel = AmxKernel(library, path)
                with torch.device("cpu"):  # first asked while a model is built on "meta"
                    reason = _self_check(kernel)
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            reason = f"the AMX kernel failed ({error})"
    if reason is not None:
        logger.info("bf16 and 4- and 8-bit weights multiply through PyTorch's kernels (no AMX "
                    "kernel: %s)", reason)
        return None
    logger.info("bf16 and 4- and 8-bit weights multiply with MoLink's AMX kernel (%s)", path)
    return kernel


def _self_check(kernel: AmxKernel) -> str | None:
    """Odd output counts (padded blocks), row counts around the tile sizes, every format,
    against float32 products of the weight each multiplies."""
    generator = torch.Generator().manual_seed(0)
    for bits, group_size in ((8, 0), (4, 32), (8, 64)):
        low = -(1 << (bits - 1))
        codes = torch.randint(low, -low, (37, 128), generator=generator, dtype=torch.int8)
        groups = 1 if group_size == 0 else 128 // group_size
        # in the model dtype, as int_linear keeps them: code * scale is exact in float32
        scales = (torch.rand(groups, 37, generator=generator) + 0.5).bfloat16().float()
        if group_size:
            zeros = torch.rand(groups, 37, generator=generator).bfloat16().float()
            grouped = codes.float().view(37, groups, group_size) * scales.t()[..., None]
            weight = (grouped + zeros.t()[..., None]).view(37, 128)
            if bits == 8:  # widened to bf16; 4-bit codes multiply exactly, scaled after
                weight = weight.bfloat16().float()
            args = (group_values(scales), bits, group_size, group_values(zeros))
        else:
            weight = codes.float() * scales[0][:, None]
            args = (pad_scales(scales[0]), bits, 0, None)
        tiles = pack(codes, bits)
        for rows in (1, 17, 64, 70):
            x = torch.randn(rows, 128, generator=generator).bfloat16()
            expected = x.float() @ weight.T
            got = kernel.matmul(x, tiles, 37, *args).float()
            if not torch.allclose(got, expected, rtol=2 ** -7, atol=1e-2):
                return f"the self-check failed for {bits}-bit codes, {rows} rows"
    weight = torch.randn(37, 100, generator=generator).bfloat16()
    bias = torch.randn(37, generator=generator)
    tiles = pack16(weight)
    for rows in (1, 17, 32, 33, 70):
        x = torch.randn(rows, 100, generator=generator).bfloat16()
        expected = x.float() @ weight.float().T + bias
        got = kernel.matmul16(x, tiles, 37, pad_scales(bias, BLOCK_PAIR)).float()
        if not torch.allclose(got, expected, rtol=2 ** -7, atol=1e-2):
            return f"the self-check failed for bf16 weights, {rows} rows"
    return None
