"""Filling a stage model from a GGUF checkpoint, keeping quantized weights quantized.

Two steps around the loader's ``to_empty``:

1. ``swap_quantized_modules`` (on the meta device): every ``nn.Linear`` whose checkpoint
   tensors include a quantized one becomes an ``IntLinear`` where an integer kernel takes
   every part (``kernel_parts``: on a CPU, Q4_0/Q4_1/Q4_K/Q8_0 in bf16 with AMX, 4-bit
   ones in bf16 elsewhere); else the LM head, on a CPU in 16 bits, stays an ``nn.Linear``
   (dequantized once, ``held_as``); else a ``QuantLinear`` (one part per tensor: a fused
   q|k|v may mix Q4_K and Q6_K); every quantized ``nn.Embedding`` becomes a
   ``QuantEmbedding``.
   Linears stored as F32/F16/BF16 stay ``nn.Linear`` and are filled like any parameter.
2. ``fill_from_gguf``: ``QuantLinear`` and ``QuantEmbedding`` get the stored bytes (a tied
   LM head shares the embedding's bytes when the stage holds both); an ``IntLinear`` gets
   the blocks' codes, scales and mins as integer groups (``gguf_quants.int_weight``: the
   same weight, scales in the model dtype), in the kernel's layout; every parameter gets
   its tensor(s), dequantized to the model dtype. Only the stage's own tensors are read.

Why both: ``QuantLinear`` dequantizes its whole weight in every forward (no kernel reads
GGUF blocks), which on a CPU costs more than the product itself: SmolLM2-135M's Q4_1 layers
took ~10 ms a layer per decode step. The integer kernels read the codes in place.
"""

from __future__ import annotations

import torch
from torch import nn

from molink.model.gguf import GGUFCheckpoint
from molink.model.gguf_quants import INT_FORMATS, int_weight
from molink.model.layers.cpu_linear import HALF_DTYPES
from molink.model.layers.int_linear import KERNEL_KINDS, IntLinear, kind_for, stored_bytes
from molink.model.layers.quant_linear import QuantEmbedding, QuantLinear, QuantPart


def _block(info) -> list:
    """A GGUF part as an ``IntLinear`` block: [rows, cols, bits, group_size, symmetric]."""
    return [info.rows, info.cols, *INT_FORMATS[info.ggml_type]]


def kernel_parts(infos, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether an integer kernel takes every one of a linear's GGUF parts on ``device`` in
    ``dtype`` (``TensorInfo``s, row order)."""
    return all(info.ggml_type in INT_FORMATS
               and kind_for(*_block(info), dtype, device) in KERNEL_KINDS for info in infos)


def int_linear_bytes(infos, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes an ``IntLinear`` filled from these parts keeps: consecutive parts of one layout
    are one block (``merge_parts``), each stored as its kind lays it out."""
    blocks: list[list] = []
    for block in map(_block, infos):
        if blocks and blocks[-1][1:] == block[1:]:
            blocks[-1][0] += block[0]
        else:
            blocks.append(block)
    return sum(stored_bytes(kind_for(*block, dtype, device), *block, dtype) for block in blocks)


def gguf_held(model: nn.Module, checkpoint: GGUFCheckpoint, dtype: torch.dtype,
              device: torch.device) -> str:
    """How a GGUF stage holds its quantized linears, for the load log; where bfloat16 would
    put the ones dequantized in each step on integer kernels, it says so."""
    kernels = sum(isinstance(m, IntLinear) for m in model.modules())
    blocks = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    held = f"GGUF weights: {kernels} linears on integer kernels"
    head = ([checkpoint.info(s) for s in model.checkpoint_names("lm_head.weight")]
            if hasattr(model, "lm_head") else [])
    if head and held_as("lm_head", head, dtype, device) == "dense":
        held += f", the LM head dequantized once to {str(dtype).removeprefix('torch.')}"
    if not blocks:
        return held
    held = f"{held}, {len(blocks)} dequantized in each step"
    if dtype != torch.bfloat16 and any(kernel_parts(
            [checkpoint.info(s) for s in model.checkpoint_names(f"{name}.weight")],
            torch.bfloat16, device) for name in blocks):
        held += " (--dtype bfloat16 would put them on integer kernels)"
    return held


def held_as(name: str, infos, dtype: torch.dtype, device: torch.device) -> str:
    """How a stage holds the linear ``name`` read from these GGUF parts: "plain" (none is
    quantized: an ``nn.Linear`` in the model dtype), "int" (``IntLinear``: a kernel takes
    every part), "dense" (the LM head on a CPU in 16 bits: dequantized once, at load, into
    an ``nn.Linear`` of the model dtype) or "blocks" (``QuantLinear``).

    Why the LM head: it is the largest matrix and read whole in every step; dequantized in
    each step it costs more than the rest of a small model's step (SmolLM2's Q8_0 head,
    49152 x 576, on a CPU without AMX), and a 16-bit copy costs its size once (2 bytes a
    weight, not ~1), where a layer's share of memory stays the file's."""
    if not any(info.quantized for info in infos):
        return "plain"
    if all(info.quantized for info in infos) and kernel_parts(infos, dtype, device):
        return "int"
    if name == "lm_head" and device.type == "cpu" and dtype in HALF_DTYPES:
        return "dense"
    return "blocks"


def swap_quantized_modules(model: nn.Module, checkpoint: GGUFCheckpoint,
                           dtype: torch.dtype, device: torch.device) -> None:
    """Replace quantized linears and embeddings in place (call on the meta device);
    ``device``: where the model will compute."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        infos = [checkpoint.info(source) for source in model.checkpoint_names(f"{name}.weight")]
        if not any(info.quantized for info in infos):
            continue
        if isinstance(module, nn.Embedding):
            (info,) = infos
            new = QuantEmbedding(module.num_embeddings, module.embedding_dim, info.ggml_type,
                                 dtype)
        elif (held := held_as(name, infos, dtype, device)) == "dense":
            continue  # stays nn.Linear, filled dequantized like any parameter
        elif held == "int":
            new = IntLinear(module.in_features, module.out_features,
                            bias=module.bias is not None)
        else:
            parts = [QuantPart(info.ggml_type, info.rows) for info in infos]
            new = QuantLinear(module.in_features, parts, bias=module.bias is not None)
            if new.out_features != module.out_features:
                raise ValueError(f"GGUF tensors for {name} have {new.out_features} rows, "
                                 f"the model expects {module.out_features}")
        replace_module(model, name, module, new)


def replace_module(root: nn.Module, path: str, old: nn.Module, new: nn.Module) -> None:
    """Register ``new`` at ``path``, and point the parent's plain handles on ``old`` to it."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    parent.add_module(leaf, new)
    for attr, value in list(vars(parent).items()):
        if value is old:
            object.__setattr__(parent, attr, new)


def fill_from_gguf(model: nn.Module, checkpoint: GGUFCheckpoint, dtype: torch.dtype,
                   device: torch.device) -> None:
    """Copy the stage's tensors into ``model`` (already materialised on ``device`` in
    ``dtype``)."""
    raw_cache: dict[str, torch.Tensor] = {}  # shared by a tied LM head and the embedding
    for name, module in model.named_modules():
        if isinstance(module, IntLinear):
            parts = [int_weight(checkpoint.read_raw(source).to(device),
                                checkpoint.info(source).ggml_type, module.in_features)
                     for source in model.checkpoint_names(f"{name}.weight")]
            module.set_weight(parts, dtype, device)
        elif isinstance(module, (QuantLinear, QuantEmbedding)):
            sources = model.checkpoint_names(f"{name}.weight")
            for i, source in enumerate(sources):
                if source not in raw_cache:
                    raw_cache[source] = checkpoint.read_raw(source).to(device)
                module.register_buffer(f"part{i}", raw_cache[source])
    for name, param in model.named_parameters():
        sources = model.checkpoint_names(name)
        parts = [checkpoint.read_dense(source, param.dtype) for source in sources]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"GGUF tensor(s) {sources} have shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(param.shape)} for {name}")
        with torch.no_grad():
            param.copy_(tensor)
