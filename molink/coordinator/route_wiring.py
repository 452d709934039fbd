"""RouteWiring: connects the stages into one route and owns the head's first hop.

A route is wired last stage first, because a stage's ``Configure`` answers only once it
reached its next hop::

    head ──first hop──> stage 0 ──> stage 1 ──> ... ──> stage k ──results──> head
                        configure k, then k-1, ..., then 0; then open the first hop

so when ``wire`` returns every hop has connected (and measured its link), and a route that
cannot work fails here, naming both ends and the address tried.
"""

from __future__ import annotations

from collections.abc import Callable

from molink.coordinator.head_config import HeadConfig
from molink.coordinator.membership import StageMember
from molink.coordinator.stage_peers import StagePeers
from molink.transport import molink_pb2 as pb
from molink.transport.hop_sender import HopSender
from molink.transport.peers import PeerSecurity


class RouteWiring:
    def __init__(self, config: HeadConfig, security: PeerSecurity, peers: StagePeers) -> None:
        self.config = config
        self.security = security
        self.peers = peers
        self.first_hop: HopSender | None = None  # to the first stage, while wired

    async def wire(self, stages: list[StageMember], *, epoch: int, source: str,
                   head_address: str, on_lost: Callable[[StageMember, str], None]) -> None:
        """Configure every stage, then open the first hop (labelled from ``source``, the
        head's own name). ``head_address``: where results go ("": where the stages dialed);
        ``on_lost(first stage, why)`` is called if the first hop breaks later. Raises
        grpc.aio.AioRpcError or ConnectionError if a hop cannot be set up."""
        for i in reversed(range(len(stages))):
            following = stages[i + 1] if i + 1 < len(stages) else None
            await self.peers.configure(stages[i], self._route(following, epoch, head_address))
        await self.close_first_hop()
        if stages:
            await self._open_first_hop(stages[0], source, on_lost)

    async def close_first_hop(self) -> None:
        if self.first_hop is not None:
            sender, self.first_hop = self.first_hop, None
            await sender.close()

    def _route(self, following: StageMember | None, epoch: int, head_address: str) -> pb.Route:
        config = self.config
        return pb.Route(next_address=following.address if following else "",
                        next_label=following.label if following else "",
                        next_fingerprint=following.fingerprint if following else "",
                        head_address=head_address, epoch=epoch,
                        link_schedule=config.link_schedule, compression=config.compression,
                        max_chunk_tokens=config.max_chunk_tokens or 0,
                        decode_stall_factor=config.decode_stall_factor)

    async def _open_first_hop(self, first: StageMember, source: str,
                              on_lost: Callable[[StageMember, str], None]) -> None:
        label = f"{source} -> {first.label}"
        config = self.config
        sender = HopSender(first.address, self.security, to_head=False,
                           schedule=config.link_schedule, compression=config.compression,
                           max_chunk_tokens=config.max_chunk_tokens, label=label,
                           expected_fingerprint=first.fingerprint)
        sender.start()
        try:
            await sender.wait_connected()
        except ConnectionError as exc:
            await sender.close()
            raise ConnectionError(f"the head cannot reach {first.label}: {exc}") from None
        sender.broken.add_done_callback(
            lambda f: on_lost(first, f"hop {label} lost: {f.result()}"))
        self.first_hop = sender
