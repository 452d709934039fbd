"""gRPC servers and channels between MoLink peers, with limits and authentication."""

from __future__ import annotations

import grpc

from molink.transport.auth import TokenAuthInterceptor, token_metadata
from molink.transport.codec import MAX_MESSAGE_BYTES

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def make_server(token: str) -> grpc.aio.Server:
    return grpc.aio.server(interceptors=[TokenAuthInterceptor(token)], options=_OPTIONS)


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Listen on host:port (port 0: the OS picks); returns the port."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise ValueError(f"cannot listen on {host}:{port} (address in use or not available)")
    return bound


def make_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=_OPTIONS)


class Peer:
    """A channel to one peer plus the metadata every call to it carries."""

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self.channel = make_channel(address)
        self.metadata = token_metadata(token)

    async def close(self) -> None:
        await self.channel.close()
