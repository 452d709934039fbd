"""AutoPlacement: the head assigns layer ranges to nodes that join without ``--layers``.

A node started without ``--layers`` (``molink join``) or with ``--layers auto`` (``molink
serve``: the head itself) offers its memory and its measured time for one layer, and waits.
The head places the layers no node serves yet (one contiguous gap: all of them at first,
the range of a node that left later) over the nodes waiting, with ``plan_placement``:

- it waits until the offers hold the gap (``DoesNotFit`` says what is missing), and for
  ``settle_s`` after the last new offer, so nodes started together are planned together;
- nodes keep the order they first offered in (the first gets the lowest layers; the head,
  when it offers, is always first: it holds the embeddings);
- a node the plan leaves without layers stays offered, for the next gap;
- a node renews its offer every second, also while it loads its range; one that stops
  (``offer_ttl_s``) or takes longer than ``load_timeout_s`` to join with its range is
  forgotten, and its share is free for the next plan.

Pure bookkeeping with an injected clock; the head does the RPCs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from molink.scheduler.placement import DoesNotFit, ModelFootprint, NodeBudget, plan_placement

HEAD = "head"  # the key of the head's own offer


@dataclass
class Offer:
    key: str  # the node's address (the head: HEAD)
    memory_bytes: int
    seconds_per_layer: float
    first_seen: float
    last_seen: float
    assigned: tuple[int, int] | None = None
    assigned_at: float = 0.0


@dataclass(frozen=True)
class Answer:
    """What to tell an offering node: a range to load, or why to wait."""

    layers: tuple[int, int] | None
    reason: str = ""


class AutoPlacement:
    def __init__(self, footprint: ModelFootprint, headroom: float = 0.1, settle_s: float = 10.0,
                 offer_ttl_s: float = 15.0, load_timeout_s: float = 1800.0,
                 head_expected: bool = False) -> None:
        self.footprint = footprint
        self._head_pending = head_expected  # serve --layers auto: no plan before its offer
        self.headroom, self.settle_s = headroom, settle_s
        self.offer_ttl_s, self.load_timeout_s = offer_ttl_s, load_timeout_s
        self.offers: dict[str, Offer] = {}
        self.last_plan = ""  # the latest placement, as logged

    def offer(self, key: str, memory_bytes: int, seconds_per_layer: float,
              missing: list[tuple[int, int]], now: float) -> Answer:
        """A node (re)offers itself; ``missing``: the ranges no member serves."""
        self._expire(now)
        offer = self.offers.get(key)
        if offer is None:
            offer = self.offers[key] = Offer(key, memory_bytes, seconds_per_layer, now, now)
        offer.last_seen = now
        self._head_pending = self._head_pending and key != HEAD
        if offer.assigned is not None:
            return Answer(offer.assigned)
        gaps = self.unplanned(missing)
        if not gaps:
            return Answer(None, "every layer is served or being loaded; this node waits "
                                "as a spare for a range that becomes free")
        if self._head_pending:
            return Answer(None, "waiting for the head to measure its own memory and speed")
        newest = max(o.first_seen for o in self._waiting())
        if now - newest < self.settle_s:
            return Answer(None, f"waiting {self.settle_s - (now - newest):.0f} s more for "
                                "other nodes before placing the layers")
        try:
            self._plan(gaps[0], now)
        except DoesNotFit as exc:
            return Answer(None, f"layers {gaps[0][0]}:{gaps[0][1]} do not fit the "
                                f"{len(self._waiting())} node(s) offered so far ({exc}); "
                                "start more nodes")
        if offer.assigned is not None:
            return Answer(offer.assigned)
        return Answer(None, "this node got no layers in the plan; it waits as a spare")

    def joined(self, key: str, start: int, end: int) -> None:
        """A node joined with ``[start, end)``: its offer, and any assignment of exactly
        that range, are done."""
        self.offers.pop(key, None)
        for other, offer in list(self.offers.items()):
            if offer.assigned == (start, end):
                del self.offers[other]

    def unplanned(self, missing: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The missing ranges less what is assigned and loading."""
        assigned = [o.assigned for o in self.offers.values() if o.assigned is not None]
        gaps = []
        for start, end in missing:
            cursor = start
            for a, b in sorted(r for r in assigned if r[0] < end and start < r[1]):
                if a > cursor:
                    gaps.append((cursor, a))
                cursor = max(cursor, b)
            if cursor < end:
                gaps.append((cursor, end))
        return gaps

    def _waiting(self) -> list[Offer]:
        """Offers without a range, the head first, then by first offer."""
        waiting = [o for o in self.offers.values() if o.assigned is None]
        return sorted(waiting, key=lambda o: (o.key != HEAD, o.first_seen))

    def _plan(self, gap: tuple[int, int], now: float) -> None:
        start, end = gap
        waiting = self._waiting()
        if start > 0:  # only a plan from layer 0 puts the head first
            waiting = [o for o in waiting if o.key != HEAD]
        nodes = [NodeBudget(o.key, o.memory_bytes, o.seconds_per_layer) for o in waiting]
        if not nodes:
            raise DoesNotFit("no node is waiting")
        placement = plan_placement(self._slice(start, end), nodes, self.headroom)
        parts = []
        for offer, stage in zip(waiting, placement.stages):
            if stage.num_layers:
                offer.assigned = (start + stage.start_layer, start + stage.end_layer)
                offer.assigned_at = now
                parts.append(f"{offer.key} {offer.assigned[0]}:{offer.assigned[1]}")
        head = self.offers.get(HEAD)
        if head is not None and head.assigned is None and start == 0:
            del self.offers[HEAD]  # the plan leaves the head without layers: it stops asking
        self.last_plan = (f"layers {start}:{end} placed over {len(parts)} node(s): "
                          f"{', '.join(parts)}; slowest stage {placement.bottleneck_s * 1e3:.1f}"
                          " ms per step")

    def _slice(self, start: int, end: int) -> ModelFootprint:
        """The footprint of layers ``[start, end)``: the embeddings and the LM head only
        where the slice holds the model's ends."""
        fp = self.footprint
        last = end == fp.num_layers
        return dataclasses.replace(
            fp, layer_weight_bytes=fp.layer_weight_bytes[start:end],
            layer_kv_bytes=fp.layer_kv_bytes[start:end],
            first_stage_bytes=fp.first_stage_bytes if start == 0 else 0,
            last_stage_bytes=fp.last_stage_bytes if last else 0,
            first_stage_work=fp.first_stage_work if start == 0 else 0.0,
            last_stage_work=fp.last_stage_work if last else 0.0)

    def _expire(self, now: float) -> None:
        for key, offer in list(self.offers.items()):
            loading = offer.assigned is not None
            if loading and now - offer.assigned_at > self.load_timeout_s:
                del self.offers[key]  # never joined with its range: the range is free again
            elif key != HEAD and now - offer.last_seen > self.offer_ttl_s:
                del self.offers[key]  # stopped asking (a loading node renews its offer)
