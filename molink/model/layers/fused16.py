"""Fused 16-bit-weight products on x86 CPUs: ``gemm16.c``, compiled on first use.

A CPU without native bf16/fp16 arithmetic (x86 without AVX512-BF16 or AMX) has two poor
choices in PyTorch for a decode batch with 16-bit weights: a bf16 product that converts on
the fly in slow generic code, or widening the weight to float32 first (four bytes written
and read per weight). ``gemm16.c`` widens in registers and multiplies in float32, as
llama.cpp does with F16C: two bytes read per weight, float32 arithmetic. The weight is packed
once, at load, into tiles of 8 outputs x 16 inputs stored one after another (``pack``), so
the kernel reads one sequential stream. Measured on an AVX2 EPYC (2816 x 1024 bf16 weights
out of cache, one thread): 1 row 0.62 ms against 1.5 (PyTorch bf16) and 1.4-1.8 (float32
weights); 16 rows 6.0 ms against 11.3 (widened to float32) and 27.6 (bf16).

The same library carries the rest of a 16-bit decode step on a CPU (``Fused16``'s
``decode_attention``, ``rms_norm``, ``rotary``, ``silu_mul``), used on any x86 CPU these
kernels run on, with or without native bf16: attention of one query per sequence over the
paged KV cache in place (float32 scores, softmax and sums; PyTorch gathers each request's
blocks and calls SDPA with a mask: 0.2 against 0.8 ms a layer for 16 sequences of ~200
tokens on a Xeon, 2 threads; its inner loops in AVX-512 where the CPU has it, 1.1-1.4x the
AVX2 ones there: the scattered KV rows, not the arithmetic, bound it), RMSNorm, RoPE,
SwiGLU's gate and the residual add in one call each where PyTorch runs 1-18 operators, with
the same roundings, and ``molink_linear16`` (``TiledCpuLinear``'s product on 16-bit
activations) for ``decode_layers``.

The C file ships with the package and is compiled once per machine with the system's C
compiler (``$CC`` or ``cc``; about 2 s) into ``$MOLINK_KERNEL_DIR`` (default
``~/.cache/molink/kernels``), named by a hash of source, flags and compiler, and loaded with
``ctypes`` (which releases the GIL during the call). Where that is impossible (not x86, no
AVX2/FMA/F16C, no compiler, a compile error, a result that fails the self-check) the
product falls back to PyTorch and the reason is logged once; ``MOLINK_CPU_KERNELS=0`` turns
the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from molink import envs
from molink.model.cpu_features import cpu_flags
from molink.model.layers.rotary import apply_rotary

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemm16.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC")
OPENMP = "-fopenmp"
COMPILE_TIMEOUT_S = 300
MAX_ROWS = 32  # beyond this a float32 GEMM of the widened weight is as fast (compute-bound)
TILE_ROWS, TILE_COLUMNS = 8, 16
NO_COMPILER = "no C compiler (set CC, or install gcc or clang)"
_ENTRY_POINTS = {torch.bfloat16: "molink_gemm_bf16", torch.float16: "molink_gemm_f16"}
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_ATTENTION_ARGTYPES = [_P, _I64, _I64, _P, _P, _P, _I64, _I64, _P, _P, _I64, _I64, _I64, _I64,
                       _I64, ctypes.c_float, _I64, _INT, _P, _INT]
_OPERATOR_ARGTYPES = {  # a decoder layer's small operators (gemm16.c, the end)
    "molink_rms_norm": [_P, _I64, _I64, _I64, _P, ctypes.c_float, _INT, _P],
    "molink_rotary": [_P, _I64, _I64, _I64, _I64, _P, _P, _INT],
    "molink_silu_mul": [_P, _I64, _I64, _INT, _P],
    "molink_add16": [_P, _P, _I64, _INT],
    "molink_linear16": [_P, _I64, _P, _I64, _I64, _P, _P, _P, _INT, _INT],  # decode_layers
}


class Fused16:
    """The compiled kernels: ``matmul(x, tiles, out_features)`` = ``x @ weight.float().T``
    for ``tiles = pack(weight)``."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._functions = {}
        for dtype, name in _ENTRY_POINTS.items():
            function = getattr(library, name)
            function.argtypes, function.restype = _ARGTYPES, None
            self._functions[dtype] = function
        self._attend = library.molink_decode_attention
        self._attend.argtypes, self._attend.restype = _ATTENTION_ARGTYPES, ctypes.c_int
        for name, argtypes in _OPERATOR_ARGTYPES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, None
            setattr(self, "_" + name.removeprefix("molink_"), function)
        self._avx512 = library.molink_attention_avx512
        self._avx512.argtypes, self._avx512.restype = [_INT], _INT

    def __deepcopy__(self, memo) -> Fused16:
        return self  # one loaded library per process: a copied module shares it

    def __reduce__(self):
        return kernels, ()  # a pickled module finds the kernels of the process that loads it

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``RMSNorm``'s forward for 16-bit ``x`` [..., n] (rows at any stride, each row
        contiguous; n a multiple of 8) and a weight of x's dtype: a new contiguous tensor."""
        rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        out = torch.empty(x.shape, dtype=x.dtype)
        self._rms_norm(rows.data_ptr(), rows.shape[0], rows.shape[1], rows.stride(0),
                       weight.data_ptr(), eps, int(x.dtype == torch.float16), out.data_ptr())
        return out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """``apply_rotary`` in place for 16-bit ``x`` [T, heads, head_dim] (rows at any
        stride, heads contiguous; head_dim a multiple of 16) and float32 tables [T, 1,
        head_dim], contiguous."""
        self._rotary(x.data_ptr(), x.shape[0], x.shape[1], x.shape[2], x.stride(0),
                     cos.data_ptr(), sin.data_ptr(), int(x.dtype == torch.float16))

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for 16-bit ``gate_up`` [T, 2n] = gate | up, contiguous (n a
        multiple of 8): [T, n]."""
        rows, width = gate_up.shape
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        self._silu_mul(gate_up.data_ptr(), rows, width // 2, int(gate_up.dtype == torch.float16),
                       out.data_ptr())
        return out

    def add_(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``h += x`` for contiguous 16-bit tensors of one dtype and shape (numel a multiple
        of 8): PyTorch's 16-bit add (float32 sum, one rounding). Returns ``h``."""
        if not (h.dtype == x.dtype and h.dtype in _ENTRY_POINTS and h.shape == x.shape
                and h.is_contiguous() and x.is_contiguous() and h.numel() % 8 == 0):
            raise ValueError(f"add_ takes two contiguous 16-bit tensors of one shape, "
                             f"{h.numel()} values a multiple of 8")
        self._add16(h.data_ptr(), x.data_ptr(), h.numel(), int(h.dtype == torch.float16))
        return h

    def attention_avx512(self, wanted: bool | None = None) -> bool:
        """Whether ``decode_attention`` takes its AVX-512 loops (head sizes of 16; the
        default where the CPU has AVX-512) rather than the AVX2 ones; ``wanted`` sets it
        (False: AVX2; True: AVX-512 where the CPU has it)."""
        return bool(self._avx512(-1 if wanted is None else int(wanted)))

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         q_rows: torch.Tensor, positions: torch.Tensor,
                         block_tables: torch.Tensor, scale: float, window: int | None,
                         out: torch.Tensor) -> None:
        """One query per sequence against its paged keys (``gemm16.c``): for sequence ``b``,
        ``q[q_rows[b]]`` ([heads, D]) attends to keys 0..``positions[b]`` (the last
        ``window`` of them with a window) through ``block_tables[b]``; the result goes to
        ``out[q_rows[b]]``. q, caches ([blocks, block_size, kv_heads, D]) and out: one 16-bit
        dtype; caches and out contiguous, q's rows at any stride (a view of the q|k|v
        product); the index tensors int64, contiguous."""
        heads, head_dim = q.shape[1], q.shape[2]
        if q.stride(2) != 1 or q.stride(1) != head_dim:
            q = q.contiguous()
        num_blocks, block_size, kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
        if out.shape[0] < q.shape[0] or out.shape[1:] != q.shape[1:]:
            raise ValueError(f"out {tuple(out.shape)} cannot hold q {tuple(q.shape)}")
        status = self._attend(
            q.data_ptr(), q.shape[0], q.stride(0), q_rows.data_ptr(), positions.data_ptr(),
            block_tables.data_ptr(), block_tables.shape[1], q_rows.shape[0], k_cache.data_ptr(),
            v_cache.data_ptr(), num_blocks, block_size, heads, kv_heads, head_dim, scale,
            window or 0, int(q.dtype == torch.float16), out.data_ptr(), torch.get_num_threads())
        if status == -2:
            raise IndexError("decode attention: a query row, position or block outside the "
                             "step's tensors or the KV cache")
        if status != 0:
            raise RuntimeError(f"decode attention refused {heads} heads over {kv_heads} of "
                               f"{head_dim} dims, or could not allocate its buffers")

    def matmul(self, x: torch.Tensor, tiles: torch.Tensor, out_features: int) -> torch.Tensor:
        """``x`` float32 [rows, in], ``tiles`` from ``pack``: float32 [rows, out_features]."""
        if tiles.dtype not in _ENTRY_POINTS:
            raise ValueError(f"no fused kernel for {tiles.dtype} tiles")
        x, out8 = pad_input(x, tiles)
        rows, in16 = x.shape
        x = x.contiguous()
        out = torch.empty(rows, out8)
        split = torch.empty(rows * in16) if tiles.dtype == torch.bfloat16 else None
        self._functions[tiles.dtype](x.data_ptr(), rows, tiles.data_ptr(), in16, out8,
                                     out.data_ptr(), None if split is None else split.data_ptr(),
                                     torch.get_num_threads())
        return out[:, :out_features]


def pad_input(x: torch.Tensor, tiles: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` [rows, in] with zero columns up to the tiles' padded width, and the tiles'
    padded number of outputs (``out_features`` rounded up to whole tiles)."""
    out8, in16 = tiles.shape[0] * TILE_ROWS, tiles.shape[1] * TILE_COLUMNS
    in_features = x.shape[-1]
    if not in16 - TILE_COLUMNS < in_features <= in16:
        raise ValueError(f"x of {in_features} columns against {in16}-column tiles")
    return (x if in_features == in16 else F.pad(x, (0, in16 - in_features))), out8


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A 16-bit [out, in] weight as the kernels read it: [out8 / 8, in16 / 16, 8, 16], zero-
    padded to whole tiles (out8, in16: the next multiples of 8 and 16)."""
    out_features, in_features = weight.shape
    padded = F.pad(weight, (0, -in_features % TILE_COLUMNS, 0, -out_features % TILE_ROWS))
    out8, in16 = padded.shape
    return padded.view(out8 // TILE_ROWS, TILE_ROWS, in16 // TILE_COLUMNS,
                       TILE_COLUMNS).transpose(1, 2).contiguous()


def unpacked(tiles: torch.Tensor) -> torch.Tensor:
    """``pack``'s inverse as a strided view [tiles, 8, in16 / 16, 16]: ``.reshape(out8,
    in16)`` gives the padded row-major weight; ``copy_`` into a view of that shape widens it
    in one pass."""
    return tiles.transpose(1, 2)


def unpack(tiles: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The row-major [out_features, in_features] weight ``tiles`` was packed from (a copy)."""
    out8, in16 = tiles.shape[0] * TILE_ROWS, tiles.shape[1] * TILE_COLUMNS
    return unpacked(tiles).reshape(out8, in16)[:out_features, :in_features].contiguous()


def unsupported_reason() -> str | None:
    """Why this machine cannot run the kernels, or None when it can (given a compiler)."""
    if not envs.cpu_kernels_enabled():
        return f"{envs.CPU_KERNELS_VAR}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "the CPU lacks AVX2"
    flags = cpu_flags()
    if flags is not None and not {"avx2", "fma", "f16c"} <= flags:
        return "the CPU lacks one of AVX2, FMA, F16C"
    if compiler() is None:
        return NO_COMPILER
    return None


@functools.cache
def kernels() -> Fused16 | None:
    """The kernels, compiled (once per machine) and loaded; None where they cannot run."""
    reason = unsupported_reason()
    if reason is not None:
        logger.info("16-bit weights multiply through PyTorch (no fused kernels: %s)", reason)
        return None
    try:
        path = compiled(SOURCE)
        fused = Fused16(ctypes.CDLL(str(path)), path)
        _self_check(fused)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("16-bit weights multiply through PyTorch: the fused kernels failed "
                       "(%s)", error)
        return None
    return fused


def compiled(source_path: Path) -> Path:
    """The shared library of a C source shipped beside this module (``gemm16.c``,
    ``int_amx.c``) for this source, flags and compiler, compiled if not yet."""
    cc = compiler()
    if cc is None:
        raise RuntimeError(NO_COMPILER)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    source = source_path.read_bytes()
    key = hashlib.sha256(source + repr((FLAGS, cc, version)).encode()).hexdigest()[:16]
    directory = Path(envs.kernel_dir())
    target = directory / f"{source_path.stem}-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("compiling %s with %s (once per machine)", source_path.name, cc)
    began = time.monotonic()
    handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(handle)
    try:
        for extra in ((OPENMP,), ()):  # without OpenMP (say, Apple clang): one thread
            done = subprocess.run([cc, *FLAGS, *extra, str(source_path), "-o", partial],
                                  capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
                                  check=False)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-400:]}")
        os.replace(partial, target)  # atomic: stages compiling at once each get a whole file
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("compiled %s in %.1f s", target, time.monotonic() - began)
    return target


def _self_check(fused: Fused16) -> None:
    """Odd shapes (padded tiles), one and several rows, against PyTorch in float32."""
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 3):
        x = torch.randn(rows, 37, generator=generator)
        weight = torch.randn(11, 37, generator=generator)
        for dtype in _ENTRY_POINTS:
            half = weight.to(dtype)
            expected = x @ half.float().T
            got = fused.matmul(x, pack(half), 11)
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
                raise RuntimeError(f"self-check failed for {dtype} with {rows} rows")
    _check_decode_step(fused, generator)


def _check_decode_step(fused: Fused16, generator: torch.Generator) -> None:
    """The decode step's kernels against PyTorch in float32 (attention: 2 sequences, GQA
    2:1, scattered blocks, 1 and 19 keys; norm, RoPE, SwiGLU, residual add on two bf16
    rows)."""
    cache = torch.randn(2, 6, 4, 1, 16, generator=generator).bfloat16()  # [2, blocks, 4, 1, D]
    q = torch.randn(2, 2, 16, generator=generator).bfloat16()
    tables = torch.tensor([[5, 0, 0, 0, 0], [3, 1, 4, 2, 0]])
    positions = torch.tensor([0, 18])
    out = torch.empty(3, 2, 16, dtype=torch.bfloat16)
    wide = fused.attention_avx512()
    for loops in {wide, False}:  # where the CPU has AVX-512, both kinds of loops
        fused.attention_avx512(loops)
        fused.decode_attention(q, cache[0], cache[1], torch.tensor([1, 0]), positions, tables,
                               0.25, None, out)
        for b, row in ((0, 1), (1, 0)):
            slots = [int(tables[b, p // 4]) * 4 + p % 4 for p in range(int(positions[b]) + 1)]
            keys, values = (cache[i].reshape(-1, 16)[slots].float() for i in (0, 1))
            expected = ((q[row].float() @ keys.T) * 0.25).softmax(-1) @ values
            if not torch.allclose(out[row].float(), expected, rtol=2 ** -7, atol=1e-3):
                fused.attention_avx512(False)
                raise RuntimeError(f"self-check failed for decode attention "
                                   f"({'AVX-512' if loops else 'AVX2'} loops)")
    fused.attention_avx512(wide)
    x = torch.randn(2, 32, generator=generator).bfloat16()
    weight = torch.randn(32, generator=generator).bfloat16()
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    angles = torch.randn(2, 1, 32, generator=generator)
    rotated = x.view(2, 2, 16).clone()
    fused.rotary(rotated, angles.cos()[..., :16].contiguous(), angles.sin()[..., :16].contiguous())
    gate, up = x.chunk(2, dim=-1)
    total = fused.add_(x.clone(), weight.expand(2, 32).contiguous())
    if not (torch.equal(total, x + weight) and torch.allclose(fused.rms_norm(x, weight, 1e-6).float(), normed.float(),
                           rtol=2 ** -6, atol=1e-3)
            and torch.allclose(fused.silu_mul(x).float(), (F.silu(gate) * up).float(),
                               rtol=2 ** -6, atol=1e-3)
            and torch.equal(rotated, apply_rotary(x.view(2, 2, 16), angles[..., :16].cos(),
                                                  angles[..., :16].sin()))):
        raise RuntimeError("self-check failed for the decode step's operators")


def compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None
