"""Placement: which contiguous layer range each stage of a pipeline serves. Pure Python.

Two ways to split the layers:

- ``split_layers``: even (every stage the same number of layers, give or take one);
- ``plan_placement``: from each node's memory and speed (issue 15). Every node's range
  must hold its weights and the KV cache for the configured context and batch with some
  headroom, and among the splits that fit, the slowest stage is as fast as possible.

Nodes keep their given order (the first node serves layer 0, the head's place); a node
may get no layers when every layer it could take would slow the pipeline down or not fit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

GB = 2**30  # memory sizes are sold and printed in binary gigabytes
DEFAULT_HEADROOM = 0.1  # of a node's memory left unplanned (CUDA context, fragmentation)


class DoesNotFit(ValueError):
    """No split of the layers fits the nodes' memory; the message says what and by how much."""


def split_layers(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """``num_stages`` contiguous half-open ranges tiling ``[0, num_layers)``.

    Every range has ``num_layers // num_stages`` layers; the ``num_layers % num_stages``
    layers left over go one each to the first stages. So sizes differ by at most one, and
    the last stage, which also projects onto the vocabulary and samples, never carries an
    extra layer::

        4 layers, 3 stages:   (0, 2) (2, 3) (3, 4)
        64 layers, 3 stages:  (0, 22) (22, 43) (43, 64)
    """
    if num_stages < 1 or num_stages > num_layers:
        raise ValueError(f"num_stages must be between 1 and num_layers ({num_layers}), "
                         f"got {num_stages}")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for i in range(num_stages):
        end = start + base + (i < extra)
        ranges.append((start, end))
        start = end
    return ranges


@dataclass(frozen=True)
class NodeBudget:
    """A node as the planner sees it: its device memory and its time for one layer."""

    name: str
    memory_bytes: int
    seconds_per_layer: float


@dataclass(frozen=True)
class ModelFootprint:
    """What a model asks of the stages: memory per layer, and what only the ends carry.

    ``first_stage_work`` / ``last_stage_work``: the extra time of the embedding / the LM
    head, in layers' worth of time on whichever node serves them.
    """

    layer_weight_bytes: tuple[int, ...]
    layer_kv_bytes: tuple[int, ...]  # KV cache for the configured context x batch
    first_stage_bytes: int = 0  # embeddings
    last_stage_bytes: int = 0  # final norm + LM head
    first_stage_work: float = 0.0
    last_stage_work: float = 0.0

    def __post_init__(self) -> None:
        if not self.layer_weight_bytes:
            raise ValueError("a model needs at least one layer to place")
        if len(self.layer_kv_bytes) != len(self.layer_weight_bytes):
            raise ValueError("layer_kv_bytes needs one entry per layer "
                             f"({len(self.layer_weight_bytes)}), got {len(self.layer_kv_bytes)}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_weight_bytes)

    def weight_bytes(self, start: int, end: int) -> int:
        """Weights of a stage serving ``[start, end)``, embeddings / LM head included."""
        return (sum(self.layer_weight_bytes[start:end])
                + (self.first_stage_bytes if start == 0 else 0)
                + (self.last_stage_bytes if end == self.num_layers else 0))

    def total_bytes(self) -> int:
        return (sum(self.layer_weight_bytes) + sum(self.layer_kv_bytes)
                + self.first_stage_bytes + self.last_stage_bytes)


@dataclass(frozen=True)
class StagePlan:
    """One node's share: layers ``[start_layer, end_layer)`` (empty: the node is idle)."""

    node: NodeBudget
    start_layer: int
    end_layer: int
    weight_bytes: int  # its layers' weights, plus embeddings / LM head where it has them
    kv_bytes: int
    seconds: float  # its time for one step of its range

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.start_layer

    @property
    def free_bytes(self) -> int:
        return self.node.memory_bytes - self.weight_bytes - self.kv_bytes


@dataclass(frozen=True)
class Placement:
    stages: tuple[StagePlan, ...]  # one per node, in node order
    bottleneck_s: float  # the slowest stage's time

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The ranges of the nodes that serve layers, in pipeline order."""
        return [(s.start_layer, s.end_layer) for s in self.stages if s.num_layers]


def plan_placement(footprint: ModelFootprint, nodes: Sequence[NodeBudget],
                   headroom: float = 0.1) -> Placement:
    """Contiguous ranges, in node order, that fit every node's memory less ``headroom``
    (a fraction) and make the slowest stage as fast as possible; among those, the fewest
    stages (fewer hops). ``DoesNotFit`` (a ValueError) says plainly what does not fit, and
    by how much.

    Exact: dynamic programming over (nodes used, layers placed), O(nodes x layers^2).
    """
    if not nodes:
        raise ValueError("give at least one node to place the layers on")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom}")
    costs = _Costs(footprint, nodes, headroom)
    best = _min_bottleneck(costs)
    if math.isinf(best):
        raise DoesNotFit(_why_it_does_not_fit(costs))
    bounds = _fewest_stages(costs, best)
    stages = tuple(costs.stage(j, start, end)
                   for j, (start, end) in enumerate(itertools.pairwise(bounds)))
    return Placement(stages, max(s.seconds for s in stages))


class _Costs:
    """Memory and time of node ``j`` serving ``[start, end)``, from prefix sums."""

    def __init__(self, footprint: ModelFootprint, nodes: Sequence[NodeBudget],
                 headroom: float) -> None:
        self.footprint, self.nodes, self.headroom = footprint, list(nodes), headroom
        self.num_layers = footprint.num_layers
        self.usable = [int(node.memory_bytes * (1 - headroom)) for node in nodes]
        self._weights = [0, *itertools.accumulate(footprint.layer_weight_bytes)]
        self._kv = [0, *itertools.accumulate(footprint.layer_kv_bytes)]

    def weight_bytes(self, start: int, end: int) -> int:
        if start == end:
            return 0
        ends = ((self.footprint.first_stage_bytes if start == 0 else 0)
                + (self.footprint.last_stage_bytes if end == self.num_layers else 0))
        return self._weights[end] - self._weights[start] + ends

    def kv_bytes(self, start: int, end: int) -> int:
        return self._kv[end] - self._kv[start]

    def fits(self, j: int, start: int, end: int) -> bool:
        return self.weight_bytes(start, end) + self.kv_bytes(start, end) <= self.usable[j]

    def fitting_starts(self, j: int, end: int):
        """Starts ``end, end - 1, ...`` of the ranges ending at ``end`` that node ``j``
        holds (an empty range always); a longer range only needs more memory."""
        for start in range(end, -1, -1):
            if start < end and not self.fits(j, start, end):
                return
            yield start

    def seconds(self, j: int, start: int, end: int) -> float:
        """Node ``j``'s step time for ``[start, end)``; inf where it does not fit."""
        if start == end:
            return 0.0
        if not self.fits(j, start, end):
            return math.inf
        work = ((end - start) + (self.footprint.first_stage_work if start == 0 else 0.0)
                + (self.footprint.last_stage_work if end == self.num_layers else 0.0))
        return work * self.nodes[j].seconds_per_layer

    def stage(self, j: int, start: int, end: int) -> StagePlan:
        return StagePlan(self.nodes[j], start, end, self.weight_bytes(start, end),
                         self.kv_bytes(start, end), self.seconds(j, start, end))


def _min_bottleneck(costs: _Costs) -> float:
    """The least possible slowest-stage time (inf: no split fits).

    ``best[k]``: the least bottleneck with layers ``[0, k)`` on the nodes seen so far.
    """
    n = costs.num_layers
    best = [0.0] + [math.inf] * n
    for j in range(len(costs.nodes)):
        best = [min(max(best[i], costs.seconds(j, i, k)) for i in costs.fitting_starts(j, k))
                for k in range(n + 1)]
    return best[n]


def _fewest_stages(costs: _Costs, bottleneck: float) -> list[int]:
    """Range bounds ``[0, ..., n]`` (one range per node) with every stage within
    ``bottleneck`` and the fewest non-empty ranges."""
    n, inf = costs.num_layers, math.inf
    used = [0] + [inf] * n  # used[k]: fewest stages placing [0, k)
    parents = []
    for j in range(len(costs.nodes)):
        nxt, parent = [inf] * (n + 1), [0] * (n + 1)
        for k in range(n + 1):
            for i in costs.fitting_starts(j, k):
                if costs.seconds(j, i, k) <= bottleneck and used[i] + (k > i) < nxt[k]:
                    nxt[k], parent[k] = used[i] + (k > i), i
        used = nxt
        parents.append(parent)
    assert used[n] < inf, "the bottleneck came from a split that fits"
    bounds = [n]
    for parent in reversed(parents):
        bounds.append(parent[bounds[-1]])
    return bounds[::-1]


def _why_it_does_not_fit(costs: _Costs) -> str:
    footprint, nodes = costs.footprint, costs.nodes
    need, offer = footprint.total_bytes(), sum(costs.usable)
    offers = ", ".join(f"{node.name} {_gb(usable)}" for node, usable in zip(nodes, costs.usable))
    nodes_text = (f"the {len(nodes)} node(s) offer {_gb(offer)} after "
                  f"{costs.headroom:.0%} headroom ({offers})")
    parts = (f"weights {_gb(sum(footprint.layer_weight_bytes))}, "
             f"KV cache {_gb(sum(footprint.layer_kv_bytes))}, embeddings and LM head "
             f"{_gb(footprint.first_stage_bytes + footprint.last_stage_bytes)}")
    if need > offer:
        return (f"the model does not fit: it needs {_gb(need)} ({parts}) but {nodes_text}: "
                f"{_gb(need - offer)} short")
    reached = _greedy_reach(costs)
    return (f"the model does not fit: it needs {_gb(need)} ({parts}) and {nodes_text}, but "
            f"no split into contiguous ranges fits: filling the nodes in order, only layers "
            f"0:{reached} of {costs.num_layers} fit")


def _greedy_reach(costs: _Costs) -> int:
    """How many leading layers fit when each node in turn takes as many as it can."""
    start = 0
    for j in range(len(costs.nodes)):
        end = start
        while end < costs.num_layers and costs.fits(j, start, end + 1):
            end += 1
        start = end
    return start


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / GB:.1f} GB"
