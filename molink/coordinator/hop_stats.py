"""HopStats: one hop of the pipeline as its sender measures it, labelled by its two ends."""

from __future__ import annotations

import dataclasses

from molink.messages import LinkReport


@dataclasses.dataclass
class HopStats:
    label: str  # "head -> layers 2:4", "layers 4:6 -> head"
    bandwidth_bps: float  # bits per second, measured (0: not yet)
    latency_s: float  # one way, measured
    bytes_sent: int
    messages_sent: int
    tokens_sent: int
    compression: str


def label_hops(labels: list[str], hops: list[LinkReport]) -> list[HopStats]:
    """``labels``: every node in pipeline order (the head first); ``hops``: the reports in
    the same order, the last one being the hop back to the head::

        labels:  head      layers 2:4      layers 4:6
        hops:       head -> 2:4   2:4 -> 4:6    4:6 -> head
    """
    stats = []
    for i, hop in enumerate(hops[:len(labels)]):
        target = labels[i + 1] if i + 1 < len(labels) else "head"
        stats.append(HopStats(f"{labels[i]} -> {target}", hop.bandwidth_bps, hop.latency_s,
                              hop.bytes_sent, hop.messages_sent, hop.tokens_sent,
                              hop.compression))
    return stats
