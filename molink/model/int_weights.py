"""Filling a stage model's linears as integer weights: AWQ/GPTQ checkpoints, or int8/int4
quantization at load time. Two steps around the loader's ``to_empty`` (as for GGUF):

1. ``swap_int_linears`` (on the meta device): which ``nn.Linear`` become ``IntLinear``.
   AWQ/GPTQ: those whose checkpoint tensors are stored packed (``X.qweight``), unless
   ``modules_to_not_convert`` names them. int8/int4: the linears of the decoder layers (names
   under a numbered layer), except routers and, for int4, layers under 32 inputs wide; the
   embedding and the LM head stay in the model dtype.
2. ``fill_int_linears``: each ``IntLinear`` reads its own parts' tensors (one checkpoint
   tensor at a time for int8/int4, quantized right away) and keeps them as integers.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from molink.model.awq_gptq import PackedScheme
from molink.model.gguf_weights import replace_module
from molink.model.layers.int_linear import IntLinear
from molink.model.weight_quant import can_quantize, quantize

logger = logging.getLogger(__name__)

_IN_A_LAYER = re.compile(r"\.\d+\.")  # decoder layers are keyed by their index
_ROUTERS = ("gate", "router", "shared_expert_gate")  # routing decisions stay exact

Scheme = PackedScheme | str  # a checkpoint's format, or "int8" / "int4" at load time


def swap_int_linears(model: nn.Module, scheme: Scheme, files) -> int:
    """Replace the linears ``scheme`` covers (call on the meta device); how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not _covered(model, name, module, scheme, files):
            continue
        new = IntLinear(module.in_features, module.out_features, bias=module.bias is not None)
        replace_module(model, name, module, new)
        swapped += 1
    label = scheme.label if isinstance(scheme, PackedScheme) else f"{scheme} at load"
    logger.info("%s: %d linear layers kept as integers", label, swapped)
    return swapped


def _covered(model: nn.Module, name: str, module: nn.Linear, scheme: Scheme, files) -> bool:
    sources = _sources(model, name)
    if isinstance(scheme, str):
        leaf = name.rpartition(".")[2]
        return (_IN_A_LAYER.search(f".{name}.") is not None and leaf not in _ROUTERS
                and can_quantize(scheme, module.in_features))
    if any(scheme.skips(source) for source in sources):
        return False
    packed = [f"{source}.qweight" in files for source in sources]
    if any(packed) and not all(packed):
        raise ValueError(f"{name}: checkpoint mixes packed and plain parts {sources}; "
                         "not supported")
    return all(packed)


def _sources(model: nn.Module, name: str) -> list[str]:
    """Checkpoint module names a linear is read from (its fused parts, in row order)."""
    return [source.removesuffix(".weight")
            for source in model.checkpoint_names(f"{name}.weight")]


def fill_int_linears(model: nn.Module, files, scheme: Scheme, dtype: torch.dtype,
                     device: torch.device) -> None:
    """Give every ``IntLinear`` its integer weight (the model is on ``device``)."""
    for name, module in model.named_modules():
        if not isinstance(module, IntLinear):
            continue
        parts = []
        for source in _sources(model, name):
            if isinstance(scheme, PackedScheme):
                suffixes = scheme.tensor_suffixes(lambda s, src=source: f"{src}.{s}" in files)
                tensors = files.read([f"{source}.{s}" for s in suffixes], device)
                by_suffix = {s: tensors[f"{source}.{s}"] for s in suffixes}
                parts.append(scheme.int_weight(by_suffix, source))
            else:
                weight = files.read([f"{source}.weight"], device)[f"{source}.weight"]
                parts.append(quantize(weight, scheme, dtype))
                del weight  # one full-precision tensor at a time
        module.set_weight(parts, dtype, device)
