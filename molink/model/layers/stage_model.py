"""StageModel and StageBody: what every architecture's stage is made of, written once.

A stage holds layers ``[start_layer, end_layer)`` of a causal LM. Its body (``model.*``,
``transformer.*``, ``backbone.*`` of the checkpoint) is always the same three parts::

    first stage:  embedding       (e.g. model.embed_tokens, transformer.wte)
    every stage:  layers           nn.ModuleDict keyed by absolute layer index
    last stage:   final norm       (e.g. model.norm, transformer.ln_f)

``StageBody`` builds them under the checkpoint's own names (``BodyNames``) from a layer
factory; a family overrides ``embed`` (an extra embedding step) or ``layer_inputs`` (what
every layer receives besides the hidden state: rotary tables, or nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from molink.model.layers.attention import AttentionMetadata, PagedAttention


class BodyNames(NamedTuple):
    """Checkpoint names of a body's parts, relative to the body (dots: nested modules)."""

    embedding: str = "embed_tokens"
    layers: str = "layers"
    norm: str = "norm"


DEFAULT_NAMES = BodyNames()


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at dotted ``path`` under ``root``, creating empty containers."""
    *parents, leaf = path.split(".")
    for name in parents:
        child = getattr(root, name, None)
        if child is None:
            child = nn.Module()
            root.add_module(name, child)
        root = child
    root.add_module(leaf, module)


def set_plain(module: nn.Module, name: str, value) -> None:
    """An attribute that nn.Module does not register (a second handle on a registered module,
    for the forward pass, so parameter names stay the checkpoint's)."""
    object.__setattr__(module, name, value)


def register_as(parent: nn.Module, name: str, handle: str, child: nn.Module) -> nn.Module:
    """Register ``child`` under its checkpoint ``name``, with a plain ``handle`` to it."""
    parent.add_module(name, child)
    set_plain(parent, handle, child)
    return child


class StageBody(nn.Module):
    """Embedding on the first stage, a range of layers, final norm on the last stage.

    ``make_layer(i)`` builds layer ``i``; ``make_norm()`` the final norm (None: the body has
    none). Layers are called as ``layer(h, *self.layer_inputs(positions), meta)``.
    """

    def __init__(self, cfg, start_layer: int, end_layer: int,
                 make_layer: Callable[[int], nn.Module],
                 make_norm: Callable[[], nn.Module] | None,
                 names: BodyNames = DEFAULT_NAMES) -> None:
        super().__init__()
        self.is_first = start_layer == 0
        self.is_last = end_layer == cfg.num_layers
        if self.is_first:
            set_module(self, names.embedding, nn.Embedding(cfg.vocab_size, cfg.hidden_size))
        # Keys are absolute layer indices so names match the checkpoint.
        layers = nn.ModuleDict({str(i): make_layer(i) for i in range(start_layer, end_layer)})
        set_module(self, names.layers, layers)
        final_norm = None
        if self.is_last and make_norm is not None:
            final_norm = make_norm()
            set_module(self, names.norm, final_norm)
        set_plain(self, "final_norm", final_norm)
        set_plain(self, "embedding",
                  self.get_submodule(names.embedding) if self.is_first else None)
        self.embedding_name = names.embedding
        self.layer_list = list(layers.values())

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, hidden]: normed on the last stage (if it has a norm), else the residual."""
        h = self.embed(input_ids, positions) if self.is_first else hidden_states  # [T, hidden]
        inputs = self.layer_inputs(positions)
        for layer in self.layer_list:
            h = layer(h, *inputs, meta)
        return h if self.final_norm is None else self.final_norm(h)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)

    def layer_inputs(self, positions: torch.Tensor) -> tuple:
        """What each layer gets between the hidden state and ``meta`` (default: nothing)."""
        return ()


class StageModel(nn.Module):
    """Base of every model class: a causal LM restricted to one layer range.

    A family says what differs in class attributes: ``body_cls`` (built as
    ``body_cls(cfg, start_layer, end_layer)``, or override ``build_body``) held under
    ``body_attr``; ``lm_head_bias`` (None: the body owns the output layer itself);
    ``checkpoint_splits`` (pairs: our parameter-name fragment, the checkpoint's fragments
    whose tensors are concatenated along dim 0 to fill it). A tied LM head reads the body's
    embedding (``{body_attr}.{embedding name}.weight``).
    """

    body_cls: type[nn.Module]
    body_attr = "model"
    lm_head_bias: bool | None = False
    checkpoint_splits: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __init__(self, cfg, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.start_layer, self.end_layer = start_layer, end_layer
        body = self.build_body(cfg, start_layer, end_layer)
        setattr(self, self.body_attr, body)
        set_plain(self, "body", body)
        self.is_first, self.is_last = body.is_first, body.is_last
        if self.is_last and self.lm_head_bias is not None:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=self.lm_head_bias)

    def build_body(self, cfg, start_layer: int, end_layer: int) -> nn.Module:
        """The range's layers (with embedding / final norm where the range has them)."""
        return self.body_cls(cfg, start_layer, end_layer)

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, hidden]: normed final hidden states on the last stage, else the residual."""
        return self.body(positions, meta, input_ids=input_ids, hidden_states=hidden_states)

    def attention_layers(self) -> list[PagedAttention]:
        """This stage's attention modules in layer order (one KV cache each)."""
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        return self.lm_head(hidden_states).float()

    def checkpoint_names(self, param_name: str) -> list[str]:
        """Checkpoint tensors that fill a parameter, concatenated along dim 0.

        Fused projections read their parts (``qkv_proj`` <- q/k/v_proj); a tied LM head
        reads the embedding (its bias, if any, stays its own).
        """
        if param_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return [f"{self.body_attr}.{self.body.embedding_name}.weight"]
        for ours, theirs in self.checkpoint_splits:
            if ours in param_name:
                return [param_name.replace(ours, part) for part in theirs]
        return [param_name]
