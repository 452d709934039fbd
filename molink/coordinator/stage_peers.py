"""StagePeers: the head's control channels to its stages (health checks, route setup).

One channel per member, opened on first use and checked against the certificate the stage
joined with, kept while it is a member. Data never flows here: activations travel on the
hops (``HopSender``); these channels carry only small RPCs, each with a deadline.
"""

from __future__ import annotations

import grpc

from molink.coordinator.membership import StageMember
from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.peers import Peer, PeerSecurity, PeerUnreachable, peer_host

HEALTH_DEADLINE_S = 2.0
CONFIGURE_DEADLINE_S = 20.0  # a stage answers once it connected to its next hop


class StagePeers:
    def __init__(self, security: PeerSecurity, is_member) -> None:
        """``is_member(stage_id)``: whether a stage is still a member (a channel opened for
        one that left meanwhile is closed at once)."""
        self.security = security
        self._is_member = is_member
        self._peers: dict[str, Peer] = {}  # stage id -> open channel

    async def get(self, member: StageMember) -> Peer:
        """The channel to ``member``, opened once; PeerUnreachable otherwise."""
        peer = self._peers.get(member.stage_id)
        if peer is None:
            try:
                peer = await Peer.open(member.address, self.security, member.fingerprint,
                                       timeout_s=HEALTH_DEADLINE_S)
            except PeerUnreachable as exc:
                raise PeerUnreachable(f"the head cannot reach {member.label}: {exc}",
                                      exc.retryable) from None
            if not self._is_member(member.stage_id):  # left meanwhile
                await peer.close()
                raise PeerUnreachable(f"{member.label} left", retryable=False)
            self._peers[member.stage_id] = peer
        return peer

    async def health(self, member: StageMember) -> pb.HealthReply:
        """The stage's health reply; grpc.aio.AioRpcError or PeerUnreachable if none."""
        peer = await self.get(member)
        return await pb_grpc.StageStub(peer.channel).Health(
            pb.HealthRequest(), metadata=peer.metadata, timeout=HEALTH_DEADLINE_S)

    async def answers(self, member: StageMember) -> bool:
        try:
            await self.health(member)
            return True
        except (grpc.aio.AioRpcError, PeerUnreachable):
            return False

    async def configure(self, member: StageMember, route: pb.Route) -> None:
        """Send ``member`` its route; it answers once it reached its next hop. A stage that
        could not reach that hop raises as it is (its message names both ends); any other
        failure is a ConnectionError naming the stage."""
        peer = await self.get(member)
        try:
            await pb_grpc.StageStub(peer.channel).Configure(
                route, metadata=peer.metadata, timeout=CONFIGURE_DEADLINE_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and exc.details().startswith("layers"):
                raise
            raise ConnectionError(f"the head cannot configure {member.label}: "
                                  f"{exc.details() or exc.code().name}") from None

    def drop(self, stage_id: str) -> Peer | None:
        """Forget a stage's channel; -> it, for the caller to close."""
        return self._peers.pop(stage_id, None)

    async def close_all(self) -> None:
        peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            await peer.close()


def stage_address(peer: str, port: int) -> str:
    """Where a stage that advertises no address is reached: the host its join came from
    (``peer``, as gRPC names it), at the port it listens on ("" if either is unknown)."""
    host = peer_host(peer)
    return f"{host}:{port}" if host and port else ""
