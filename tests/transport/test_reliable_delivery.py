"""A hop's stream survives broken connections: what was not acknowledged is sent again on a
re-opened stream, the receiver drops repeats, and every step arrives once, in order. A hop
that cannot be re-opened is reported lost within its bound, never waited on forever."""

from __future__ import annotations

import asyncio
import socket
import struct

from molink.messages import BatchEntry, StepPlan
from molink.transport import hop_sender
from molink.transport import molink_pb2 as pb
from molink.transport import molink_pb2_grpc as pb_grpc
from molink.transport.dedup import DuplicateFilter
from molink.transport.hop_sender import HopSender
from molink.transport.outgoing import OutgoingStep
from molink.transport.peers import PeerSecurity, bind, make_server

SECURITY = PeerSecurity("delivery-test-token", None)  # plain TCP: the relay can cut it
NUM_STEPS = 300


class Receiver(pb_grpc.StageServicer):
    """What a stage does with its inbound stream: take fresh messages, then acknowledge."""

    def __init__(self) -> None:
        self.step_ids: list[int] = []
        self.num_repeats = 0
        self._filter = DuplicateFilter()

    async def Forward(self, request_iterator, context):
        async for message in request_iterator:
            if not message.probe:
                if self._filter.fresh(message.sender_id, message.seq):
                    self.step_ids.append(message.step_id)
                else:
                    self.num_repeats += 1
            yield pb.Ack()


class CuttableRelay:
    """Forwards TCP to a target; ``cut()`` resets every connection it carries."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sockets: list = []
        self.server = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.sockets += [writer, up_writer]

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self.sockets:
            sock = writer.get_extra_info("socket")
            if sock is not None:  # RST, not FIN: what a broken link looks like
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self.sockets.clear()


def _step(step_id: int) -> OutgoingStep:
    plan = StepPlan(step_id, [BatchEntry(f"r{step_id}", 0, 1, True)])
    return OutgoingStep(plan, None, 1)


async def _serve(receiver: Receiver):
    server = make_server(SECURITY)
    pb_grpc.add_StageServicer_to_server(receiver, server)
    port = bind(server, "127.0.0.1", 0, SECURITY)
    await server.start()
    return server, port


def test_every_step_arrives_once_in_order_across_cut_connections():
    async def scenario():
        receiver = Receiver()
        server, port = await _serve(receiver)
        relay = CuttableRelay(port)
        await relay.start()
        sender = HopSender(f"127.0.0.1:{relay.port}", SECURITY, to_head=False, schedule="fifo")
        sender.start(probe=False)
        await sender.wait_connected()
        try:
            for step_id in range(NUM_STEPS):
                sender.submit(_step(step_id))
                if step_id % 100 == 50:
                    await asyncio.sleep(0.01)  # some in flight, unacknowledged
                    relay.cut()
                if step_id % 10 == 0:
                    await asyncio.sleep(0)
            for _ in range(200):
                if len(receiver.step_ids) >= NUM_STEPS and not sender._unacked:
                    break
                await asyncio.sleep(0.05)
            return receiver, sender.num_reconnects, sender.broken.done()
        finally:
            await sender.close()
            await server.stop(0)

    receiver, num_reconnects, broken = asyncio.run(scenario())
    assert receiver.step_ids == list(range(NUM_STEPS))
    assert num_reconnects >= 1
    assert not broken


def test_a_hop_that_stays_down_is_reported_lost_within_its_bound(monkeypatch):
    monkeypatch.setattr(hop_sender, "REOPEN_TIMEOUT_S", 2.0)

    async def scenario():
        receiver = Receiver()
        server, port = await _serve(receiver)
        sender = HopSender(f"127.0.0.1:{port}", SECURITY, to_head=False, schedule="fifo")
        sender.start(probe=False)
        await sender.wait_connected()
        await server.stop(0)  # the receiver is gone for good
        loop = asyncio.get_running_loop()
        started = loop.time()
        sender.submit(_step(0))
        try:
            reason = await asyncio.wait_for(sender.broken, 15)
            return reason, loop.time() - started
        finally:
            await sender.close()

    reason, waited = asyncio.run(scenario())
    assert reason
    assert 2.0 <= waited < 8.0
