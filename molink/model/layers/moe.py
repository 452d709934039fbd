"""Sparse mixture of experts: a top-k router and a bank of gated experts in 3-D tensors.

A sparse MoE block replaces a decoder layer's dense MLP: the router picks ``top_k`` of
``num_experts`` experts for each token, with a weight each; every expert is a gated MLP; a
token's output is the weighted sum of its experts' outputs.

Each expert runs only on the tokens routed to it. Tokens are grouped by expert with one
stable sort (no loop over tokens); the Python loop is over experts, skipping the idle ones::

    expert_ids [T=3, k=2]    [[2, 0], [1, 2], [2, 3]]
    assignments (t * k + s)    2  0  1  2  2  3
    sorted by expert           0 | 1 | 2  2  2 | 3        counts [1, 1, 3, 1]
    token of each assignment   0 | 1 | 0  1  2 | 2        -> index_select, expert, index_add_

Experts are added to each token in ascending expert order, as ``transformers`` does, so the
floating-point sums match it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.arch_config import FamilyOptions
from molink.model.layers.mlp import get_activation

Glu = Callable[[torch.Tensor], torch.Tensor]  # [n, 2 * inter] -> [n, inter]

SOFTMAX_THEN_TOPK = "softmax_then_topk"  # Mixtral, Qwen MoE: top-k of the softmax over all experts
TOPK_THEN_SOFTMAX = "topk_then_softmax"  # gpt-oss: softmax over the k largest logits only


def chunked_glu(act_name: str) -> Glu:
    """act(gate) * up, with the gate in the first half of the columns and up in the second."""
    act = get_activation(act_name)

    def glu(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up

    return glu


def clamped_swiglu(alpha: float, limit: float) -> Glu:
    """gpt-oss: columns interleave gate and up (g0 u0 g1 u1 ...); both are clamped."""

    def glu(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return glu


@dataclass(frozen=True)
class MoeOptions(FamilyOptions):
    """Settings every sparse-MoE family has (its options subclass this)."""

    num_experts: int
    num_experts_per_tok: int


class TopKRouter(nn.Module):
    """Router logits -> the top-k experts of each token and their weights.

    ``scoring`` fixes the order of softmax and top-k; ``renormalize`` rescales the chosen
    softmax probabilities to sum to 1; ``float_weights`` keeps the weights in float32 (Mixtral)
    instead of casting them to the input dtype (Qwen MoE).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 scoring: str = SOFTMAX_THEN_TOPK, renormalize: bool = False,
                 float_weights: bool = False, bias: bool = False) -> None:
        super().__init__()
        if scoring not in (SOFTMAX_THEN_TOPK, TOPK_THEN_SOFTMAX):
            raise ValueError(f"router scoring {scoring!r} is not supported")
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring, self.renormalize, self.float_weights = scoring, renormalize, float_weights
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> (expert ids [T, k] long, weights [T, k])."""
        logits = F.linear(x, self.weight, self.bias)  # [T, E]
        if self.scoring == TOPK_THEN_SOFTMAX:
            top_logits, ids = torch.topk(logits, self.top_k, dim=-1)
            return ids, torch.softmax(top_logits, dim=-1)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights if self.float_weights else weights.to(logits.dtype)


class FusedExperts(nn.Module):
    """``num_experts`` gated MLPs whose weights are stacked in 3-D tensors (HF names).

    ``transposed=False`` (Mixtral, Qwen MoE): each expert's matrices are ``[out, in]`` as in
    ``nn.Linear``: gate_up_proj ``[E, 2 * inter, hidden]``, down_proj ``[E, hidden, inter]``.
    ``transposed=True`` (gpt-oss): ``[in, out]``: gate_up_proj ``[E, hidden, 2 * inter]``,
    down_proj ``[E, inter, hidden]``, plus biases ``[E, 2 * inter]`` and ``[E, hidden]``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, glu: Glu, *,
                 transposed: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.transposed = transposed
        self.glu = glu
        gate_up = (hidden_size, 2 * intermediate_size)
        down = (intermediate_size, hidden_size)
        if not transposed:
            gate_up, down = gate_up[::-1], down[::-1]
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, *gate_up))
        self.down_proj = nn.Parameter(torch.empty(num_experts, *down))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor,
                expert_weights: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden]; expert_ids, expert_weights: [T, k] -> [T, hidden]."""
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.flatten()  # [T * k] assignments, token-major
        order = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert
        token_rows = order // top_k  # [T * k] token of each sorted assignment
        weights = expert_weights.flatten()[order]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # one host sync
        out = torch.zeros_like(x)
        end = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            start, end = end, end + count
            rows = token_rows[start:end]
            y = self._expert(expert, x.index_select(0, rows)) * weights[start:end, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's gated MLP on its tokens: [n, hidden] -> [n, hidden]."""
        if self.transposed:  # same ops as transformers' gpt-oss: matmul, then add the bias
            h = x @ self.gate_up_proj[e]
            h = h + self.gate_up_proj_bias[e] if self.gate_up_proj_bias is not None else h
            y = self.glu(h) @ self.down_proj[e]
            return y + self.down_proj_bias[e] if self.down_proj_bias is not None else y
        gate_up_bias = None if self.gate_up_proj_bias is None else self.gate_up_proj_bias[e]
        down_bias = None if self.down_proj_bias is None else self.down_proj_bias[e]
        h = F.linear(x, self.gate_up_proj[e], gate_up_bias)
        return F.linear(self.glu(h), self.down_proj[e], down_bias)


class SparseMoeBlock(nn.Module):
    """Router (``gate``) -> experts, plus an optional sigmoid-gated shared expert (Qwen2-MoE)."""

    def __init__(self, gate: TopKRouter, experts: FusedExperts,
                 shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Linear | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        if shared_expert is not None:
            assert shared_expert_gate is not None, "a shared expert needs its gate"
            self.shared_expert = shared_expert
            self.shared_expert_gate = shared_expert_gate
        self.has_shared_expert = shared_expert is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        expert_ids, expert_weights = self.gate(x)
        out = self.experts(x, expert_ids, expert_weights)
        if self.has_shared_expert:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def router_and_experts(cfg, intermediate_size: int, **router_flags
                       ) -> tuple[TopKRouter, FusedExperts]:
    """The top-k router and the gated experts (``act(gate) * up``) of ``cfg.options``."""
    options: MoeOptions = cfg.options
    gate = TopKRouter(cfg.hidden_size, options.num_experts, options.num_experts_per_tok,
                      **router_flags)
    experts = FusedExperts(options.num_experts, cfg.hidden_size, intermediate_size,
                           chunked_glu(cfg.hidden_act))
    return gate, experts


def per_expert_names(prefix: str, num_experts: int, parts: tuple[str, ...]) -> list[str]:
    """Per-expert checkpoint matrices that stack into one 3-D tensor, expert by expert.

    ``per_expert_names("m.experts", 2, ("w1", "w3"))`` ->
    ``[m.experts.0.w1.weight, m.experts.0.w3.weight, m.experts.1.w1.weight, ...]``; the
    loader concatenates them along dim 0 and views the result as ``[E, rows, cols]``.
    """
    return [f"{prefix}.{i}.{part}.weight" for i in range(num_experts) for part in parts]


class ExpertCheckpointMixin:
    """For MoE ``DecoderLM`` subclasses: experts from fused 3-D tensors or per-expert matrices.

    Our expert parameters carry the fused names of ``transformers`` 5 modules
    (``model.layers.3.mlp.experts.gate_up_proj`` ``[E, 2 * inter, hidden]``). Hub checkpoints,
    and ``save_pretrained`` of ``transformers`` 5 too, store one matrix per expert instead
    (``model.layers.3.block_sparse_moe.experts.7.w1.weight``). The loader tells the model which
    tensor names the checkpoint has; a fused name that is absent is read per expert::

        gate_up_proj  <-  [e0.gate, e0.up, e1.gate, e1.up, ...]  cat dim 0, view [E, 2I, H]
        down_proj     <-  [e0.down, e1.down, ...]                cat dim 0, view [E, H, I]

    Subclasses set ``per_expert_block`` (the MoE block's module name in per-expert
    checkpoints) and ``per_expert_parts`` (per-expert matrix names of each fused tensor).
    """

    per_expert_block = "mlp"
    per_expert_parts: dict[str, tuple[str, ...]] = {
        "gate_up_proj": ("gate_proj", "up_proj"),
        "down_proj": ("down_proj",),
    }
    _checkpoint_tensor_names: frozenset[str] = frozenset()

    def select_checkpoint_layout(self, names: frozenset[str]) -> None:
        """Called by the loader with every tensor name of the checkpoint."""
        self._checkpoint_tensor_names = names

    def checkpoint_names(self, param_name: str) -> list[str]:
        if param_name not in self._checkpoint_tensor_names:
            per_expert = self._per_expert_names(param_name)
            if per_expert is not None:
                return per_expert
        return super().checkpoint_names(param_name)

    def _per_expert_names(self, param_name: str) -> list[str] | None:
        layer_prefix, sep, tail = param_name.rpartition(".mlp.")
        if not sep:
            return None
        block = f"{layer_prefix}.{self.per_expert_block}"
        fused = tail.removeprefix("experts.")
        if fused != tail and fused in self.per_expert_parts:
            num_experts = self.cfg.options.num_experts
            return per_expert_names(f"{block}.experts", num_experts, self.per_expert_parts[fused])
        if tail == "gate.weight" and self.per_expert_block != "mlp":
            return [f"{block}.gate.weight"]
        return None
