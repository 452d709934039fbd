"""The DeepSeek mixture-of-experts block: a router, routed experts and shared experts.

Routing (``topk_method``), as ``transformers`` computes it:

* ``greedy`` (V2): softmax scores, the ``top_k`` highest;
* ``group_limited_greedy`` (V2): softmax scores; experts are split into ``n_group`` groups,
  the ``topk_group`` groups with the highest best-expert score are kept, top-k among them;
* ``noaux_tc`` (V3): sigmoid scores plus a learned ``e_score_correction_bias`` choose the
  experts (groups ranked by the sum of their two best biased scores); the weights are the
  unbiased scores of the chosen experts, optionally normalised to sum to one.

The weights are multiplied by ``routed_scaling_factor``. The router runs in float32 whatever
the model dtype, and keeps its parameters in float32 (as ``transformers`` does): the
correction bias separates scores that bfloat16 cannot tell apart.

Expert weights are stacked: ``experts.gate_up_proj`` ``[E, 2 * I, hidden]`` (gate rows, then
up rows) and ``experts.down_proj`` ``[E, hidden, I]``, the names and shapes of the
``transformers`` 5 modules. Checkpoints hold them either so or per expert
(``experts.{e}.gate_proj.weight``, the hub layout and what ``save_pretrained`` writes); the
model's ``checkpoint_names`` picks the tensors, the loader stacks per-expert ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.layers.mlp import GatedMLP, get_activation

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


class DeepseekRouter(nn.Module):
    """hidden [T, hidden] -> (weights [T, top_k] fp32, expert ids [T, top_k] long)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, topk_method: str,
                 num_groups: int | None, topk_groups: int | None, norm_topk_prob: bool,
                 routed_scaling_factor: float) -> None:
        super().__init__()
        assert topk_method in TOPK_METHODS, topk_method  # validated in arch_config
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        if topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(
                torch.empty(num_experts, dtype=torch.float32))
        self.num_experts, self.top_k, self.topk_method = num_experts, top_k, topk_method
        self.num_groups, self.topk_groups = num_groups or 1, topk_groups or 1
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor

    def _apply(self, fn, recurse: bool = True):
        """Moves like any module, but its parameters stay float32 when the model is cast."""
        super()._apply(fn, recurse)
        for param in self.parameters(recurse=False):
            if param.dtype != torch.float32:
                param.data = param.data.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight)  # [T, E]
        if self.topk_method == "noaux_tc":
            weights, ids = self._biased_sigmoid_topk(logits.sigmoid())
        else:
            scores = logits.softmax(dim=-1)
            if self.topk_method == "group_limited_greedy":
                best_in_group = scores.view(-1, self.num_groups, self._group_size).amax(dim=-1)
                scores = scores.masked_fill(~self._kept_experts(best_in_group), 0.0)
            weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return weights * self.routed_scaling_factor, ids

    @property
    def _group_size(self) -> int:
        return self.num_experts // self.num_groups

    def _biased_sigmoid_topk(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scores: [T, E] sigmoid -> (weights, ids) by bias-corrected, group-limited top-k."""
        biased = scores + self.e_score_correction_bias
        grouped = biased.view(-1, self.num_groups, self._group_size)
        group_scores = grouped.topk(min(2, self._group_size), dim=-1).values.sum(dim=-1)
        biased = biased.masked_fill(~self._kept_experts(group_scores), float("-inf"))
        ids = torch.topk(biased, k=self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights, ids

    def _kept_experts(self, group_scores: torch.Tensor) -> torch.Tensor:
        """group_scores: [T, G] -> [T, E] bool, True in the ``topk_groups`` best groups."""
        top_groups = torch.topk(group_scores, k=self.topk_groups, dim=-1, sorted=False).indices
        kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        return kept.repeat_interleave(self._group_size, dim=1)


class RoutedExperts(nn.Module):
    """Gated-MLP experts; each token's output is the routing-weighted sum of its experts."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 act: str) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden]; expert_ids, weights: [T, top_k] -> [T, hidden]."""
        top_k = expert_ids.shape[1]
        # Sort the (token, choice) pairs by expert; experts then take contiguous runs.
        flat_ids = expert_ids.flatten()  # [T * top_k]
        order = flat_ids.argsort(stable=True)
        tokens = order // top_k
        flat_weights = weights.flatten()[order]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = tokens[start:start + count]
            gate, up = F.linear(x[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down_proj[expert])  # [count, hidden]
            y = y * flat_weights[start:start + count, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += count
        return out


class DeepseekMoE(nn.Module):
    """``mlp`` of a DeepSeek MoE layer: routed experts plus always-on shared experts."""

    def __init__(self, hidden_size: int, act: str, mlp_bias: bool, router: DeepseekRouter,
                 moe_intermediate_size: int, num_shared_experts: int) -> None:
        super().__init__()
        self.gate = router
        self.experts = RoutedExperts(router.num_experts, hidden_size, moe_intermediate_size, act)
        self.shared_experts = None
        if num_shared_experts:
            self.shared_experts = GatedMLP(hidden_size, moe_intermediate_size * num_shared_experts,
                                           act, mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(x)  # [T, top_k] each
        out = self.experts(x, expert_ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
