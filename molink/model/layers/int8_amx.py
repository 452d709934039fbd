"""Int8 weights times bf16 activations with AMX: ``int8_amx.c``, compiled on first use.

PyTorch's int8 weight-only kernel (``aten._weight_int8pack_mm``) computes one activation row
at a time, so the rows of a decode batch or a prefill fragment each cost a pass over the
weight: on a Xeon with AMX (2816 x 1024, 2 threads, weights out of cache) 16 rows take 0.99
ms against 0.30 for bf16 weights, and an int8 model is slower than its bf16 original exactly
where it should be faster. ``int8_amx.c`` reads each 16 x 32 block of codes once per call,
widens it to bf16 in registers and lets AMX multiply it with up to 64 rows: 1-16 rows in
0.15-0.16 ms (1 thread: 0.31), half the bf16 product's time, as it reads half the bytes.

Only on CPUs with AMX-BF16 (``amx_bf16``, ``amx_tile``, ``avx512_bf16`` in the CPU's flags)
and Linux's permission for AMX state; elsewhere, or where compiling, loading or the
self-check fails, int8 stays on PyTorch's kernel and the reason is logged once.
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

SOURCE = Path(__file__).with_name("int8_amx.c")
MAX_ROWS = 64  # rows per kernel call (four AMX accumulator tiles); more rows: several calls
BLOCK_OUT, BLOCK_IN = 16, 32  # one AMX B tile: 16 outputs x 32 inputs
REQUIRED_FLAGS = frozenset({"amx_bf16", "amx_tile", "avx512_bf16", "avx512bw"})
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]


class Int8Amx:
    """The compiled kernel: ``matmul(x, tiles, scales, out)`` = ``x @ (codes * scales).T``
    for ``tiles = pack(codes)`` and ``scales = pad_scales(scales)``, in bf16."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._gemm = library.molink_gemm_i8_amx
        self._gemm.argtypes, self._gemm.restype = _ARGTYPES, None

    def matmul(self, x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor,
               out_features: int) -> torch.Tensor:
        """``x`` bf16 [rows, in] -> bf16 [rows, out_features]."""
        blocks_out, blocks_in = tiles.shape[0], tiles.shape[1]
        in32, out16 = blocks_in * BLOCK_IN, blocks_out * BLOCK_OUT
        in_features = x.shape[-1]
        if not in32 - BLOCK_IN < in_features <= in32:
            raise ValueError(f"x of {in_features} columns against {in32}-column tiles")
        if x.dtype != torch.bfloat16:
            raise ValueError(f"the AMX int8 kernel takes bf16 activations, not {x.dtype}")
        x = (x if in_features == in32 else F.pad(x, (0, in32 - in_features))).contiguous()
        rows = x.shape[0]
        out = torch.empty(rows, out16, dtype=torch.bfloat16)
        threads = torch.get_num_threads()
        for start in range(0, rows, MAX_ROWS):
            count = min(MAX_ROWS, rows - start)
            self._gemm(x[start].data_ptr(), count, tiles.data_ptr(), in32, out16,
                       scales.data_ptr(), out[start].data_ptr(), threads)
        return out if out16 == out_features else out[:, :out_features]


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Signed int8 codes [out, in] as the kernel reads them: [out16 / 16, in32 / 32, 16, 32],
    zero-padded to whole blocks; row ``p`` of a block holds, for each of its 16 outputs, the
    codes of inputs ``2p`` and ``2p + 1`` (AMX's pair-interleaved B tile)."""
    out_features, in_features = codes.shape
    padded = F.pad(codes, (0, -in_features % BLOCK_IN, 0, -out_features % BLOCK_OUT))
    out16, in32 = padded.shape
    blocks = padded.view(out16 // BLOCK_OUT, BLOCK_OUT, in32 // BLOCK_IN, BLOCK_IN // 2, 2)
    return blocks.permute(0, 2, 3, 1, 4).reshape(out16 // BLOCK_OUT, in32 // BLOCK_IN,
                                                 BLOCK_IN // 2, 2 * BLOCK_OUT)


def unpack(tiles: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """``pack``'s inverse: the [out_features, in_features] codes (a copy)."""
    blocks_out, blocks_in = tiles.shape[0], tiles.shape[1]
    codes = tiles.view(blocks_out, blocks_in, BLOCK_IN // 2, BLOCK_OUT, 2).permute(0, 3, 1, 2, 4)
    return codes.reshape(blocks_out * BLOCK_OUT, blocks_in * BLOCK_IN)[
        :out_features, :in_features].contiguous()


def pad_scales(scales: torch.Tensor) -> torch.Tensor:
    """[out] scales as the kernel reads them: float32, zero-padded to whole 16-output blocks."""
    return F.pad(scales.float(), (0, -scales.shape[0] % BLOCK_OUT)).contiguous()


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
        return "no C compiler (set CC, or install gcc or clang)"
    return None


@functools.cache
def kernels() -> Int8Amx | None:
    """The kernel, compiled (once per machine) and loaded; None where it cannot run."""
    reason = unsupported_reason()
    if reason is None:
        try:
            path = fused16.compiled(SOURCE)
            library = ctypes.CDLL(str(path))
            if library.molink_amx_init() != 1:
                reason = "Linux refused AMX state (arch_prctl)"
            else:
                kernel = Int8Amx(library, path)
                reason = _self_check(kernel)
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            reason = f"the AMX kernel failed ({error})"
    if reason is not None:
        logger.info("int8 weights multiply through PyTorch's int8 kernel (no AMX kernel: %s)",
                    reason)
        return None
    return kernel


def _self_check(kernel: Int8Amx) -> str | None:
    """Odd shapes (padded blocks), row counts around the tile sizes, against float32."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (37, 70), generator=generator, dtype=torch.int8)
    scales = torch.rand(37, generator=generator) + 0.5
    tiles, padded = pack(codes), pad_scales(scales)
    for rows in (1, 17, 64, 70):
        x = torch.randn(rows, 70, generator=generator).bfloat16()
        expected = x.float() @ (codes.float() * scales[:, None]).T
        got = kernel.matmul(x, tiles, padded, 37).float()
        if not torch.allclose(got, expected, rtol=2 ** -7, atol=1e-2):
            return f"the self-check failed for {rows} rows"
    return None
