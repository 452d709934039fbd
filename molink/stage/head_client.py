"""A stage's Join call to the head, and asking the head for a layer range.

``call_join`` is one Join RPC: the reply, or ``StageRefused`` (a reason no retry fixes:
token, model, dtype, layers) or ``HeadUnreachable`` (not up yet, restarting, network).
``ask_for_layers``: a stage started without ``--layers`` offers its memory and speed and
asks again every second until the head assigns it a range (the head waits for other
nodes to offer first, and until the offers hold the model); ``keep_offering`` renews the
offer while the range loads. Both keep one connection (``HeadSession``) for their calls,
opened again only after a call fails, instead of a TLS handshake every second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.auth import REFUSAL
from molink.transport.peers import Peer, PeerSecurity, PeerUnreachable

logger = logging.getLogger(__name__)

JOIN_DEADLINE_S = 10.0
ASK_INTERVAL_S = 1.0
_UNREACHABLE_LOG_S = 30.0


class StageRefused(Exception):
    """The head refused this stage; the message says why."""


class HeadUnreachable(Exception):
    """The head did not answer (not up yet, restarting, or the network is down)."""


async def call_join(head_address: str, security: PeerSecurity,
                    info: pb.StageInfo) -> tuple[pb.JoinReply, str]:
    """One Join RPC on a connection of its own: (the reply, the head's certificate
    fingerprint)."""
    session = HeadSession(head_address, security)
    try:
        return await session.join(info)
    finally:
        await session.close()


class HeadSession:
    """Join RPCs to the head on one connection, opened on first use and again after a call
    that failed (the head restarted, the network broke)."""

    def __init__(self, head_address: str, security: PeerSecurity) -> None:
        self.head_address, self.security = head_address, security
        self.num_opened = 0
        self._peer: Peer | None = None

    async def join(self, info: pb.StageInfo) -> tuple[pb.JoinReply, str]:
        """(the reply, the head's certificate fingerprint); raises StageRefused or
        HeadUnreachable."""
        peer = self._peer or await self._open()
        try:
            reply = await pb_grpc.HeadStub(peer.channel).Join(
                pb.JoinRequest(stage=info), metadata=peer.metadata, timeout=JOIN_DEADLINE_S)
        except grpc.aio.AioRpcError as exc:
            await self.close()
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise StageRefused(REFUSAL) from None
            raise HeadUnreachable(exc.details() or exc.code().name) from None
        return reply, peer.fingerprint

    async def close(self) -> None:
        peer, self._peer = self._peer, None
        if peer is not None:
            await peer.close()

    async def _open(self) -> Peer:
        try:
            self._peer = await Peer.open(self.head_address, self.security)
        except PeerUnreachable as exc:
            if exc.retryable:
                raise HeadUnreachable(str(exc)) from None
            raise StageRefused(REFUSAL if "proof of the cluster token" in str(exc)
                               else str(exc)) from None
        self.num_opened += 1
        return self._peer


async def ask_for_layers(head_address: str, security: PeerSecurity, info: pb.StageInfo,
                         on_wait: Callable[[str], None]) -> tuple[int, int]:
    """The range the head assigns this node; ``on_wait(reason)`` when the reason to wait
    changes. Raises StageRefused."""
    session = HeadSession(head_address, security)
    try:
        return await _ask(session, _offer(info), on_wait)
    finally:
        await session.close()


async def _ask(session: HeadSession, offer: pb.StageInfo,
               on_wait: Callable[[str], None]) -> tuple[int, int]:
    last_reason, last_unreachable_log = "", 0.0
    while True:
        try:
            reply, _ = await session.join(offer)
        except HeadUnreachable as exc:
            now = time.monotonic()
            if now - last_unreachable_log > _UNREACHABLE_LOG_S:
                logger.warning("waiting for the head at %s (%s); retrying",
                               session.head_address, exc)
                last_unreachable_log = now
            await asyncio.sleep(ASK_INTERVAL_S)
            continue
        if reply.assigned_end > reply.assigned_start:
            return reply.assigned_start, reply.assigned_end
        if not reply.wait:
            raise StageRefused(reply.reason)
        if reply.reason != last_reason:
            last_reason = reply.reason
            on_wait(reply.reason)
        await asyncio.sleep(ASK_INTERVAL_S)


async def keep_offering(head_address: str, security: PeerSecurity, info: pb.StageInfo) -> None:
    """Renew the offer while the assigned range loads, so the head keeps the range for this
    node (a node that stops renewing is forgotten and its range placed again)."""
    offer = _offer(info)
    session = HeadSession(head_address, security)
    try:
        while True:
            await asyncio.sleep(ASK_INTERVAL_S)
            try:
                await session.join(offer)
            except (HeadUnreachable, StageRefused) as exc:
                logger.debug("renewing the offer: %s", exc)
    finally:
        await session.close()


def _offer(info: pb.StageInfo) -> pb.StageInfo:
    offer = pb.StageInfo()
    offer.CopyFrom(info)
    offer.auto_layers, offer.start_layer, offer.end_layer = True, 0, 0
    return offer
