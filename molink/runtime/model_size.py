"""ModelSize: a model's memory per layer from its config.json alone (for ``molink plan``).

The model is built on the meta device (shapes, no memory, no weights read). Its layers
live in the body's ``nn.ModuleDict`` keyed by absolute layer index (``StageBody``); what
is outside it belongs to the first stage (embeddings) or the last (final norm, LM head),
which the one-layer stages ``[0, 1)`` and ``[n - 1, n)`` tell apart. KV bytes per layer
come from the layer's attention modules; recurrent state (Mamba) is not counted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.gguf_quants import row_bytes
from molink.model.gguf_weights import held_as, int_linear_bytes
from molink.model.layers.attention import PagedAttention
from molink.model.loader import load_config, resolve_dtype
from molink.runtime.device_profile import GPUS, DeviceProfile, GpuSpec, roofline
from molink.runtime.emulated_executor import DEFAULT_EMULATED_BLOCKS
from molink.scheduler.placement import ModelFootprint

QUANT_GROUP_SIZE = 128  # parameters per 16-bit scale in a quantized matrix
_SCALE_BYTES = 2


@dataclass(frozen=True)
class ModelSize:
    """The model as a plan needs it: its footprint and what the speed models read."""

    name: str
    arch: ArchConfig
    footprint: ModelFootprint
    dtype_bytes: int  # activations, KV cache, unquantized weights
    layer_bytes_per_param: float  # of the layers' weights (the roofline's input)


QUANTIZATION_BITS = {"int8": 8, "int4": 4}


def measure_model(path: str, dtype: str, bits: int | None, kv_tokens: int,
                  quantization: str | None = None,
                  device: torch.device | None = None) -> ModelSize:
    """Sizes for weights in ``dtype`` and a KV cache of ``kv_tokens`` tokens (context x
    batch) in ``dtype``. Layer matrices take ``bits`` when given, else as the model will be
    held: an AWQ/GPTQ checkpoint's bits, ``quantization``'s (int8 / int4 at load), a GGUF
    file's tensors the bytes the file stores them in, or, on a CPU ``device`` where integer
    kernels take them, the bytes their ``IntLinear`` keeps (``gguf_weights``; None: the
    file's bytes, as on a GPU)."""
    loaded = load_config(path)
    arch, n = loaded.arch, loaded.arch.num_layers
    if bits is None:
        bits = QUANTIZATION_BITS.get(quantization or "") or (loaded.packed and loaded.packed.bits)
    torch_dtype = resolve_dtype(dtype, arch, torch.device("meta"))
    dtype_bytes = torch_dtype.itemsize
    stored = (_gguf_bytes(loaded.gguf, torch_dtype, device)
              if loaded.gguf is not None and bits is None else None)
    sizer = _ParamBytes(dtype_bytes, bits, stored)
    full = _build(loaded.model_class, arch, 0, n)
    layers = _layers(full)
    names = {id(p): name for name, p in full.named_parameters()}
    layer_weights = tuple(
        math.ceil(sum(sizer.of(full, names[id(p)], p, in_layer=True) for p in layer.parameters()))
        for layer in layers)
    layer_kv = tuple(kv_tokens * _kv_bytes_per_token(layer, dtype_bytes) for layer in layers)
    first = _outside_layers(_build(loaded.model_class, arch, 0, 1), sizer)
    last = _outside_layers(_build(loaded.model_class, arch, n - 1, n), sizer) if n > 1 else 0
    mean_layer = sum(layer_weights) / n
    footprint = ModelFootprint(layer_weights, layer_kv, first, last,
                               # decode reads every weight once: time ~ bytes
                               last_stage_work=last / mean_layer if mean_layer else 0.0)
    layer_params = sum(p.numel() for layer in layers for p in layer.parameters())
    return ModelSize(Path(path).expanduser().resolve().name, arch, footprint, dtype_bytes,
                     sum(layer_weights) / layer_params if layer_params else dtype_bytes)


def _gguf_bytes(checkpoint, dtype: torch.dtype, device: torch.device | None):
    """``stored(model, name)``: the bytes a stage keeps a GGUF parameter's tensors in (the
    file's, or its ``IntLinear``'s on ``device``), or None for tensors stored unquantized
    (they load in the model dtype)."""
    def stored(model: nn.Module, name: str) -> int | None:
        infos = [checkpoint.info(source) for source in model.checkpoint_names(name)]
        if not any(info.quantized for info in infos):
            return None
        module, held = name.rpartition(".")[0], "blocks"  # embeddings; any linear on a GPU
        if device is not None and isinstance(model.get_submodule(module), nn.Linear):
            held = held_as(module, infos, dtype, device)
        if held == "dense":
            return None  # dequantized into the model dtype
        if held == "int":
            return int_linear_bytes(infos, dtype, device)
        return sum(info.rows * row_bytes(info.ggml_type, info.cols) for info in infos)
    return stored


class _ParamBytes:
    """Bytes of a parameter: as stored quantized (``stored``), else ``dtype_bytes`` each, or
    ``bits / 8`` plus a 16-bit scale per ``QUANT_GROUP_SIZE`` for a layer's matrices when
    quantized (bits < 16)."""

    def __init__(self, dtype_bytes: int, bits: int | None, stored=None) -> None:
        self.dtype_bytes, self.bits, self.stored = dtype_bytes, bits, stored

    def of(self, model: nn.Module, name: str, param: nn.Parameter, in_layer: bool) -> float:
        numel = param.numel()
        if self.stored is not None and param.dim() >= 2:
            stored = self.stored(model, name)
            if stored is not None:
                return stored
        if not in_layer or self.bits is None or param.dim() < 2:
            return numel * self.dtype_bytes
        if self.bits >= 16:
            return numel * self.bits // 8
        return numel * self.bits / 8 + -(-numel // QUANT_GROUP_SIZE) * _SCALE_BYTES


def _build(model_class: type, arch: ArchConfig, start: int, end: int) -> nn.Module:
    with torch.device("meta"):
        return model_class(arch, start, end)


def _layers(stage: nn.Module) -> list[nn.Module]:
    """The stage's layers in order: its ModuleDict keyed by absolute layer index."""
    keys = [str(i) for i in range(stage.start_layer, stage.end_layer)]
    for module in stage.modules():
        if isinstance(module, nn.ModuleDict) and list(module.keys()) == keys:
            return [module[key] for key in keys]
    raise ValueError(f"{type(stage).__name__} keeps no layer dict keyed by layer index: "
                     "its layer sizes cannot be measured")


def _outside_layers(stage: nn.Module, sizer: _ParamBytes) -> int:
    """Bytes of a stage's parameters outside its layers (embeddings, final norm, LM head)."""
    inside = {id(p) for layer in _layers(stage) for p in layer.parameters()}
    return int(sum(sizer.of(stage, name, p, in_layer=False)
                   for name, p in stage.named_parameters() if id(p) not in inside))


def _kv_bytes_per_token(layer: nn.Module, dtype_bytes: int) -> int:
    return sum(2 * m.num_kv_heads * m.head_dim * dtype_bytes
               for m in layer.modules() if isinstance(m, PagedAttention))


def roofline_for(gpu: GpuSpec, model: ModelSize) -> DeviceProfile:
    """A roofline device for ``model``: its layers read the bytes they are stored in (a
    quantized layer reads fewer), its KV cache is read in the model dtype, and the last
    stage reads its LM head (and final norm) for every step that samples."""
    arch = model.arch
    profile = roofline(gpu, arch.hidden_size, arch.intermediate_size, arch.num_heads,
                       arch.num_kv_heads, arch.head_dim, bytes_per_param=model.layer_bytes_per_param,
                       lm_head_params=arch.vocab_size * arch.hidden_size,
                       lm_head_bytes=model.footprint.last_stage_bytes)
    # The roofline reads the KV cache at the weights' bytes per parameter; it is in the dtype.
    context = profile.context_ms_per_layer_per_1k * model.dtype_bytes / model.layer_bytes_per_param
    return dataclasses.replace(profile, context_ms_per_layer_per_1k=context)


def emulated_profile(source: str, model_path: str, dtype: str,
                     quantization: str | None = None) -> DeviceProfile:
    """``--emulate-device SOURCE`` for a stage of this model: a GPU name is its roofline at
    the model's real bytes (``roofline_for``); ``published`` and JSON files as they are."""
    if source not in GPUS:
        return DeviceProfile.load(source)
    return roofline_for(GPUS[source], measure_model(model_path, dtype, None, 0, quantization))


def emulated_stage(source: str, model_path: str, dtype: str, quantization: str | None,
                   layers: tuple[int, int], block_size: int,
                   num_blocks: int | None) -> tuple[DeviceProfile, int]:
    """The profile and KV blocks of an emulated stage serving ``layers``: on a GPU, its
    weights must fit the GPU and the KV cache gets what is left (``num_blocks`` when given,
    if it fits); a profile without a GPU (``published``, JSON) keeps what it is given."""
    if source not in GPUS:
        return DeviceProfile.load(source), num_blocks or DEFAULT_EMULATED_BLOCKS
    gpu = GPUS[source]
    model = measure_model(model_path, dtype, None, 1, quantization)  # KV bytes per token
    return roofline_for(gpu, model), kv_blocks_that_fit(gpu, model, layers, block_size,
                                                        num_blocks)


def kv_blocks_that_fit(gpu: GpuSpec, model: ModelSize, layers: tuple[int, int],
                       block_size: int, num_blocks: int | None = None) -> int:
    """KV blocks a stage serving ``layers`` of ``model`` (measured with ``kv_tokens=1``)
    has room for on ``gpu`` next to its weights (embeddings / LM head included at the
    ends): ``num_blocks`` when given and it fits, else all. Raises ValueError when the
    weights and one block do not fit, or ``num_blocks`` do not."""
    start, end = layers
    footprint = model.footprint
    weights = footprint.weight_bytes(start, end)
    per_block = sum(footprint.layer_kv_bytes[start:end]) * block_size
    usable = gpu.usable_bytes
    where = (f"layers {start}:{end} of {model.name} on an emulated {gpu.name} "
             f"({usable / 2**30:.1f} GiB usable of {gpu.memory_gib:g} GiB)")
    if weights + per_block > usable:
        raise ValueError(f"{where} do not fit: {weights / 2**30:.1f} GiB of weights; serve "
                         "fewer layers on it or quantize them (--quantization int8|int4)")
    if not per_block:
        return num_blocks or DEFAULT_EMULATED_BLOCKS
    room = int((usable - weights) // per_block)
    if num_blocks and num_blocks > room:
        raise ValueError(f"{where}: {num_blocks:,} KV blocks ({num_blocks * per_block / 2**30:.1f}"
                         f" GiB) and {weights / 2**30:.1f} GiB of weights do not fit; at most "
                         f"{room:,} blocks")
    return num_blocks or room
