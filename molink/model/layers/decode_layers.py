"""A decode step's decoder layers in one C call (``decode_layers.c``).

On a CPU, a 16-bit decode step of a Llama-shaped stage runs its work in MoLink's kernels
(AMX or fused16 products, ``fused16``'s attention, norms, RoPE and SwiGLU); what is left
between them is Python: ~13 module calls a layer with their views, checks and allocations,
~3 ms of a 12-layer step that computes in ~10 (a quarter of one stream's time per token).
``DecodeLayers`` calls the same kernels, with the same arguments and in the same order,
from one C loop over the stage's layers: a step's hidden states and KV cache come out bit
for bit as the module path's, which stays the reference (and runs everything else: prefill
chunks, steps mixing prefill and decode, models or layers it does not cover).

It covers the plain pre-norm block (``DecoderLayer`` in the sequential layout) with
``RMSNorm`` norms, optional per-head q/k ``RMSNorm`` (Qwen3), full-width rotate-half RoPE
from one table, no soft-capping, ALiBi or sinks, a SwiGLU MLP, and all four products of one
kind (``product_kind``): ``AmxLinear`` (bf16 on a CPU with AMX), ``IntLinear`` of 8- or 4-bit
codes in AMX tiles (``--quantization int8`` / ``int4``, AWQ/GPTQ or GGUF Q4/Q8 there), or
``TiledCpuLinear`` (bf16 or float16 on a CPU without native bf16, steps of up to
``fused16.MAX_ROWS`` rows); hidden size, ``heads * head_dim`` and the MLP width multiples of
32. ``use_decode_layers`` attaches it where every layer of a stage qualifies.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.layers import fused16, int_amx
from molink.model.layers.attention import AttentionMetadata
from molink.model.layers.cpu_linear import HALF_DTYPES, TiledCpuLinear
from molink.model.layers.decoder import DecoderBody, DecoderLayer, RotaryAttention
from molink.model.layers.int_linear import IntLinear
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.norm import RMSNorm
from molink.model.layers.packed_linear import AmxLinear
from molink.model.layers.rotary import apply_rotary

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_layers.c")
_KERNELS = ("amx", "amx_int", "linear", "attention", "rms_norm", "rotary", "silu_mul", "add",
            "group_sums")
_NORMS = ("input_norm", "post_norm", "q_norm", "k_norm")
_PRODUCTS = ("qkv", "o", "gate_up", "down")
# the products' kinds: bf16 weights in AMX tiles, 8- or 4-bit codes in AMX tiles, fused16's
AMX16, AMX_INT, FUSED16 = "amx", "amx-int", "linear"
_CODES_IN_TILES = ("int8amx", "groupamx")  # IntLinear's kinds on int_amx.c


class _Kernels(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in _KERNELS]


class _Dims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in (
        "hidden", "heads", "kv_heads", "head_dim", "inter", "qkv_width", "block_size", "f16")]


class _Product(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_void_p) for name in ("weights", "scales", "bias", "zeros")]
                + [("bits", ctypes.c_int64), ("group_size", ctypes.c_int64)])


class _Fields(NamedTuple):
    """A product as ``_Product`` carries it (tensors, then the codes' format)."""

    weights: torch.Tensor
    scales: torch.Tensor | None
    bias: torch.Tensor | None
    zeros: torch.Tensor | None = None
    bits: int = 0
    group_size: int = 0


class _Layer(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_void_p) for name in _NORMS]
                + [(name, _Product) for name in _PRODUCTS]
                + [(name, ctypes.c_void_p) for name in ("k_cache", "v_cache")]
                + [("num_blocks", ctypes.c_int64), ("window", ctypes.c_int64)]
                + [(name, ctypes.c_float) for name in (
                    "input_eps", "post_eps", "q_eps", "k_eps", "scale")])


@functools.cache
def library() -> ctypes.CDLL | None:
    """``decode_layers.c`` compiled (once per machine, as ``fused16``'s kernels) and loaded;
    None where that fails (logged)."""
    try:
        lib = ctypes.CDLL(str(fused16.compiled(SOURCE)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("decode steps call their layers one by one (%s)", error)
        return None
    lib.molink_decode_layers.restype = ctypes.c_int
    return lib


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


def _norm_reason(norm: nn.Module, size: int, dtype: torch.dtype) -> str | None:
    if type(norm) is not RMSNorm or norm.kernel is None:
        return f"{type(norm).__name__} is not a plain RMSNorm on fused16's kernel"
    if norm.weight.dtype != dtype or norm.weight.shape != (size,):
        return f"a norm weight of {norm.weight.dtype} {tuple(norm.weight.shape)}"
    return None


def product_kind(linear: nn.Module) -> str | None:
    """``AMX16``, ``AMX_INT`` or ``FUSED16``: how ``molink_decode_layers`` multiplies by
    ``linear``'s weights as its module does; None where it does not."""
    if type(linear) is AmxLinear:
        return AMX16
    if type(linear) is TiledCpuLinear:
        return FUSED16
    if (type(linear) is IntLinear and linear.amx is not None and len(linear.blocks) == 1
            and linear.blocks[0].kind in _CODES_IN_TILES and not linear.blocks[0].permuted):
        return AMX_INT
    return None


def _dtype_of(linear: nn.Module) -> torch.dtype:
    return linear.weight_dtype if type(linear) is IntLinear else linear.tiles.dtype


def layer_reason(layer: nn.Module) -> str | None:
    """Why ``molink_decode_layers`` cannot run ``layer``'s decode steps, or None."""
    if not isinstance(layer, DecoderLayer) or type(layer).forward is not DecoderLayer.forward:
        return f"{type(layer).__name__} is not the plain decoder layer"
    if not layer.sequential:
        return f"the {layer.layout} layout"
    attn, mlp = layer.self_attn, layer.mlp
    if type(attn).forward is not RotaryAttention.forward:
        return f"{type(attn).__name__}'s own attention"
    paged = attn.attn
    if (attn.rotate is not apply_rotary or attn.rope_in_fp32 or attn.rope_kernel is None
            or attn.sinks is not None):
        return "its rotary embedding or attention sinks"
    if paged.decode_kernel is None or paged.softcap is not None or paged.alibi_slopes is not None:
        return "its attention (soft-capping, ALiBi, or no decode kernel)"
    if type(mlp) is not GatedMLP or mlp.act is not F.silu or mlp.kernel is None:
        return f"its MLP ({type(mlp).__name__})"
    hidden, head_dim = layer.input_layernorm.weight.shape[0], attn.head_dim
    q_size, kv_size, inter = attn.q_size, attn.kv_size, mlp._down.in_features
    products = ((attn._qkv_proj, hidden, q_size + 2 * kv_size), (attn._out_proj, q_size, hidden),
                (mlp._gate_up, hidden, 2 * inter), (mlp._down, inter, hidden))
    kind = product_kind(attn._qkv_proj)
    for linear, in_features, out_features in products:
        if kind is None or product_kind(linear) != kind or (
                linear.in_features, linear.out_features) != (in_features, out_features):
            return (f"a {type(linear).__name__} product, not weights in AMX tiles or fused16's "
                    f"(all four alike)")
    dtype = _dtype_of(attn._qkv_proj)
    if dtype not in HALF_DTYPES or any(_dtype_of(p) != dtype for p, _, _ in products) or any(
            p.bias is not None and p.bias.dtype != dtype for p, _, _ in products):
        return f"{dtype} weights"
    if hidden % 32 or q_size % 32 or inter % 32 or head_dim % 16:
        return f"sizes not multiples of 32 (hidden {hidden}, q {q_size}, MLP {inter})"
    norms = [(layer.input_layernorm, hidden), (layer.post_attention_layernorm, hidden)]
    if attn.has_qk_norm:
        norms += [(attn._q_norm, head_dim), (attn._k_norm, head_dim)]
    return next(filter(None, (_norm_reason(norm, size, dtype) for norm, size in norms)), None)


class DecodeLayers:
    """Runs ``layers`` (each one ``layer_reason`` accepts, all of one shape) for a decode
    step in one call to ``molink_decode_layers``."""

    def __init__(self, layers: list[DecoderLayer], lib: ctypes.CDLL, fused) -> None:
        self.layers = layers
        self._run = lib.molink_decode_layers
        attn, mlp = layers[0].self_attn, layers[0].mlp
        qkv = attn._qkv_proj
        self.kind = product_kind(qkv)
        self.dtype = _dtype_of(qkv)
        products = {"amx": None, "amx_int": None, "linear": None, "group_sums": None}
        if self.kind == FUSED16:
            products["linear"] = _address(fused._linear16)
        elif self.kind == AMX16:
            products["amx"] = _address(qkv.amx._gemm16)
        else:
            products["amx_int"] = _address(qkv.amx._gemm)
            products["group_sums"] = _address(qkv.amx._group_sums)
        self._kernels = _Kernels(
            **products, attention=_address(fused._attend), rms_norm=_address(fused._rms_norm),
            rotary=_address(fused._rotary), silu_mul=_address(fused._silu_mul),
            add=_address(fused._add16))
        self.hidden, inter = layers[0].input_layernorm.weight.shape[0], mlp._down.in_features
        self.head_dim = attn.head_dim
        # the q|k|v product's outputs padded to its weights' blocks
        qkv_width = _held(qkv)[0][2].shape[0] * (
            fused16.TILE_ROWS if self.kind == FUSED16 else int_amx.BLOCK_OUT)
        self._dims = _Dims(hidden=self.hidden, heads=attn.num_heads, kv_heads=attn.num_kv_heads,
                           head_dim=attn.head_dim, inter=inter, qkv_width=qkv_width,
                           f16=int(self.dtype == torch.float16))
        widest = max(self.hidden, attn.q_size, inter)
        # scratch per row: a product's input, the q|k|v product, o / down, gate|up; and
        # fused16's products' float32 input (twice: widened, split) and output, or the
        # group sums of codes with zeros (groups of 32 inputs or more)
        self._scratch_row = widest + qkv_width + self.hidden + 2 * inter
        self._scratch32_row = (2 * widest + max(qkv_width, 2 * inter) if self.kind == FUSED16
                               else widest // int_amx.BLOCK_IN if self.kind == AMX_INT else 0)
        self._descriptors = None
        self._watched: list[tuple[dict, str, object]] = []  # what they point into
        self._bias_versions: list[tuple[torch.Tensor, int]] = []
        self._biases: list[torch.Tensor] = []  # biases the descriptors point at (copies kept)

    def __deepcopy__(self, memo) -> None:
        return None  # a copied model runs its layers one by one (pointers are per tensor)

    def __reduce__(self):
        return type(None), ()  # likewise for a pickled one

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor | None:
        """``h`` [T, hidden] after the layers, or None where this is not a step of T decode
        queries in the weights' dtype with a bound KV cache of it (and, for fused16's
        products, at most ``fused16.MAX_ROWS`` of them): the caller runs the modules."""
        rows = h.shape[0]
        if (meta.state is not None or len(meta.groups) != 1 or h.dtype != self.dtype
                or (self.kind == FUSED16 and rows > fused16.MAX_ROWS)):
            return None
        group = meta.groups[0]
        if (not group.is_decode or group.token_index.shape[0] != rows
                or cos.shape != (rows, 1, self.head_dim) or cos.dtype != torch.float32
                or not (cos.is_contiguous() and sin.is_contiguous())
                or h.shape[1] != self.hidden):
            return None
        descriptors = self._current_descriptors()
        if descriptors is None:
            return None
        q_rows, positions, tables = group.decode_rows()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        out = h.clone(memory_format=torch.contiguous_format)
        scratch = torch.empty(rows * self._scratch_row, dtype=self.dtype)
        scratch32 = torch.empty(rows * self._scratch32_row)
        status = self._run(
            ctypes.byref(self._kernels), ctypes.byref(self._dims), descriptors,
            ctypes.c_int64(len(self.layers)), ctypes.c_void_p(out.data_ptr()),
            ctypes.c_int64(rows), ctypes.c_void_p(cos.data_ptr()),
            ctypes.c_void_p(sin.data_ptr()), ctypes.c_void_p(slots.data_ptr()),
            ctypes.c_void_p(q_rows.data_ptr()), ctypes.c_void_p(positions.data_ptr()),
            ctypes.c_void_p(tables.data_ptr()), ctypes.c_int64(tables.shape[1]),
            ctypes.c_int64(q_rows.shape[0]), ctypes.c_void_p(scratch.data_ptr()),
            ctypes.c_void_p(scratch32.data_ptr()), ctypes.c_int(torch.get_num_threads()))
        if status == -2:
            raise IndexError("decode step: a cache slot, query row, position or block outside "
                             "the step's tensors or the KV cache")
        if status != 0:
            raise RuntimeError(f"decode_layers.c refused the step ({status})")
        return out

    def _current_descriptors(self):
        """The layers' descriptors, rebuilt when a weight, bias or KV cache was replaced (or
        a bias changed in place: its float32 copy is stale); None while a cache is unbound,
        not of the weights' dtype or not of the layers' shape."""
        if self._descriptors is not None and all(
                owner.get(name) is held for owner, name, held in self._watched) and all(
                bias._version == version for bias, version in self._bias_versions):
            return self._descriptors
        caches = [layer.self_attn.attn.kv_cache for layer in self.layers]
        heads = (self._dims.kv_heads, self.head_dim)
        if any(c is None or c.dtype != self.dtype or not c.is_contiguous()
               or c.dim() != 5 or c.shape[3:] != heads or c.shape[2] != caches[0].shape[2]
               for c in caches):
            return None
        self._dims.block_size = caches[0].shape[2]
        self._biases = []
        self._descriptors = (_Layer * len(self.layers))(*map(self._descriptor, self.layers))
        self._watched = [watched for layer in self.layers for watched in _watched(layer)]
        self._bias_versions = [(held, held._version) for owner, name, held in self._watched
                               if name == "bias" and held is not None]
        return self._descriptors

    def _descriptor(self, layer: DecoderLayer) -> _Layer:
        attn, paged = layer.self_attn, layer.self_attn.attn
        norms, products = _parts(layer)
        fields = [_product_fields(p, self.kind) for p in products]
        self._biases += [f.bias for f in fields if f.bias is not None]
        k_cache, v_cache = paged.kv_cache[0], paged.kv_cache[1]
        eps = [layer.input_layernorm.eps, layer.post_attention_layernorm.eps,
               *((attn._q_norm.eps, attn._k_norm.eps) if attn.has_qk_norm else (0.0, 0.0))]
        return _Layer(*(_pointer(None if n is None else n.weight) for n in norms),
                      *(_Product(*map(_pointer, f[:4]), f.bits, f.group_size) for f in fields),
                      k_cache.data_ptr(),
                      v_cache.data_ptr(), k_cache.shape[0], paged.window or 0, *eps, paged.scale)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _product_fields(linear: nn.Module, kind: str) -> _Fields:
    """A product as ``molink_decode_layers`` reads it: the bias float32 and zero-padded to
    the tiles' outputs for the products that add it before rounding, the module's own for
    codes (added after, as ``IntLinear``); codes: their bits and group size (0: int8 with a
    scale per output)."""
    held = [tensor for _, _, tensor in _held(linear)]
    if kind == AMX_INT:
        block = linear.blocks[0]
        return _Fields(held[0], held[1], None if linear.bias is None else linear.bias.detach(),
                       held[2], block.bits, block.group_size if block.kind == "groupamx" else 0)
    if kind == AMX16:
        return _Fields(held[0], None, linear._padded_bias())
    return _Fields(held[0], None, None if linear.bias is None else int_amx.pad_scales(
        linear.bias.detach(), fused16.TILE_ROWS))  # fused16's tiles: outputs padded to 8


def _held(linear: nn.Module) -> list[tuple[dict, str, object]]:
    """(where, name, tensor) of a product's weights (then scales and zeros), then its bias."""
    names = (("_buffers", "qweight0"), ("_buffers", "scales0"), ("_buffers", "zeros0")) if type(
        linear) is IntLinear else (("_parameters", "tiles"),)
    return [(getattr(linear, where), name, getattr(linear, where).get(name))
            for where, name in (*names, ("_parameters", "bias"))]


def _parts(layer: DecoderLayer):
    """(norms, products) of a layer: None for the per-head norms it lacks."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm,
             *((attn._q_norm, attn._k_norm) if attn.has_qk_norm else (None, None)))
    return norms, (attn._qkv_proj, attn._out_proj, mlp._gate_up, mlp._down)


def _watched(layer: DecoderLayer) -> list[tuple[dict, str, object]]:
    """(where, name, what): each tensor a layer's descriptor was built from, as its module
    holds it (a dict lookup to check per step, not a module attribute)."""
    norms, products = _parts(layer)
    return ([(n._parameters, "weight", n.weight) for n in norms if n is not None]
            + [held for p in products for held in _held(p)]
            + [(layer.self_attn.attn.__dict__, "kv_cache", layer.self_attn.attn.kv_cache)])


def use_decode_layers(model: nn.Module, fused) -> int:
    """Let ``model``'s decode steps run its layers in one call where every layer qualifies
    (``layer_reason``) and the body rotates with one table; ``fused``: ``fused16.kernels()``.
    How many layers (0: the modules run them, the reason logged)."""
    body = getattr(model, "body", None)
    if not isinstance(body, DecoderBody) or not body.layer_list:
        return 0
    reason = ("layers rotate with several tables" if len(body.rotaries) != 1 else
              next(filter(None, map(layer_reason, body.layer_list)), None))
    lib = library() if reason is None else None
    if reason is not None or lib is None:
        logger.info("decode steps call their layers one by one (%s)",
                    reason or "decode_layers.c did not load")
        return 0
    body.decode_layers = DecodeLayers(body.layer_list, lib, fused)
    logger.info("decode steps run %d layers in one call (decode_layers.c, %s products)",
                len(body.layer_list), body.decode_layers.kind)
    return len(body.layer_list)
