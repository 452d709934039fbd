"""DuplicateFilter: which numbered messages a receiver has already taken, per sender; and
``take_each``, the receiving side of a hop's stream built on it.

A sender numbers the messages it sends on its hop (1, 2, 3, ...) and, when a broken stream
is re-opened, sends again every message that was not acknowledged. Some of those may have
arrived before the break (their acknowledgement was lost with the stream): the receiver
drops them here, so a step is computed once whatever happened to the connection.
"""

from __future__ import annotations

import asyncio
import collections

import grpc

from molink.transport import molink_pb2 as pb
from molink.transport.codec import WireFormatError

MAX_SENDERS = 64  # senders remembered; older ones (routes long replaced) are forgotten


class DuplicateFilter:
    def __init__(self) -> None:
        self._last: collections.OrderedDict[str, int] = collections.OrderedDict()

    def fresh(self, sender_id: str, seq: int) -> bool:
        """True the first time (sender, seq) is seen, in sequence; False for a repeat.
        Unnumbered messages (seq 0: probes, old peers) are always fresh."""
        if not seq:
            return True
        last = self._last.get(sender_id, 0)
        if seq <= last:
            return False
        self._last[sender_id] = seq
        self._last.move_to_end(sender_id)
        while len(self._last) > MAX_SENDERS:
            self._last.popitem(last=False)
        return True


async def take_each(request_iterator, context, decode, received: DuplicateFilter, take,
                    what: str):
    """The receiving side of a hop's stream: each message is decoded (a malformed one
    aborts the stream), given to ``take`` unless it repeats one already taken, and only
    then acknowledged, so an acknowledged message is never lost with a broken stream.
    Probes are acknowledged untouched. Yields the acknowledgements."""
    try:
        async for message in request_iterator:
            if not message.probe:
                try:
                    item = decode(message)
                except WireFormatError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"malformed {what}: {exc}")
                if received.fresh(item.sender_id, item.seq):
                    take(item)
            yield pb.Ack()
    except asyncio.CancelledError:  # the server is stopping: end the stream quietly
        return
