"""Filling a stage model from a GGUF checkpoint, keeping quantized weights quantized.

Two steps around the loader's ``to_empty``:

1. ``swap_quantized_modules`` (on the meta device): every ``nn.Linear`` whose checkpoint
   tensors include a quantized one becomes a ``QuantLinear`` (one part per tensor: a fused
   q|k|v may mix Q4_K and Q6_K), every quantized ``nn.Embedding`` a ``QuantEmbedding``.
   Linears stored as F32/F16/BF16 stay ``nn.Linear`` and are filled like any parameter.
2. ``fill_from_gguf``: the quantized modules get the stored bytes (a tied LM head shares the
   embedding's bytes when the stage holds both); every parameter gets its tensor(s),
   dequantized to the model dtype. Only the stage's own tensors are read.
"""

from __future__ import annotations

import torch
from torch import nn

from molink.model.gguf import GGUFCheckpoint
from molink.model.layers.quant_linear import QuantEmbedding, QuantLinear, QuantPart


def swap_quantized_modules(model: nn.Module, checkpoint: GGUFCheckpoint,
                           dtype: torch.dtype) -> None:
    """Replace quantized linears and embeddings in place (call on the meta device)."""
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


def fill_from_gguf(model: nn.Module, checkpoint: GGUFCheckpoint, device: torch.device) -> None:
    """Copy the stage's tensors into ``model`` (already materialised on ``device``)."""
    raw_cache: dict[str, torch.Tensor] = {}  # shared by a tied LM head and the embedding
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
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
