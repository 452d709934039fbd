"""A node without --layers asks the head for a range every second: on one connection (not a
TLS handshake per ask), opened again only after a call fails."""

from __future__ import annotations

import asyncio

import pytest

from molink.stage import head_client
from molink.stage.head_client import HeadSession, HeadUnreachable, ask_for_layers
from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.peers import PeerSecurity, bind, make_server

SECURITY = PeerSecurity("head-client-test-token", None)


class _Head(pb_grpc.HeadServicer):
    """Tells a node to wait ``waits`` times, then assigns it layers 0:4; records the
    client address of every call (a new connection has a new port)."""

    def __init__(self, waits: int) -> None:
        self.waits = waits
        self.callers: list[str] = []

    async def Join(self, request, context):
        self.callers.append(context.peer())
        if len(self.callers) <= self.waits:
            return pb.JoinReply(accepted=False, wait=True, reason="waiting for more nodes")
        return pb.JoinReply(accepted=False, assigned_start=0, assigned_end=4)


async def _start(head: _Head, port: int = 0):
    server = make_server(SECURITY)
    pb_grpc.add_HeadServicer_to_server(head, server)
    port = bind(server, "127.0.0.1", port, SECURITY)
    await server.start()
    return server, port


def test_asking_for_layers_keeps_one_connection(monkeypatch):
    monkeypatch.setattr(head_client, "ASK_INTERVAL_S", 0.01)
    head = _Head(waits=5)

    async def scenario():
        server, port = await _start(head)
        try:
            reasons = []
            layers = await ask_for_layers(f"127.0.0.1:{port}", SECURITY,
                                          pb.StageInfo(memory_bytes=1), reasons.append)
            return layers, reasons
        finally:
            await server.stop(0)

    layers, reasons = asyncio.run(scenario())
    assert layers == (0, 4) and reasons == ["waiting for more nodes"]
    assert len(head.callers) == 6 and len(set(head.callers)) == 1


def test_a_session_opens_again_after_the_head_restarts():
    async def scenario():
        head = _Head(waits=100)
        server, port = await _start(head)
        session = HeadSession(f"127.0.0.1:{port}", SECURITY)
        try:
            for _ in range(3):
                await session.join(pb.StageInfo())
            await server.stop(0)
            with pytest.raises(HeadUnreachable):
                await session.join(pb.StageInfo())
            server, _ = await _start(head, port)  # the head is back, same address
            reply, _ = await session.join(pb.StageInfo())
            return reply, session.num_opened
        finally:
            await session.close()
            await server.stop(0)

    reply, opened = asyncio.run(scenario())
    assert reply.wait and opened == 2
