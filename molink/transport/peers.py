"""gRPC servers and channels between MoLink peers, with limits, keepalive and authentication.

Keepalive is agreed on both ends. Every peer pings its connections every ``keepalive_s``
(10 s by default) and drops one whose ping is not answered within half that, so a dead or
frozen peer is noticed in seconds even on a stream that carries nothing. Servers accept
those pings at any rate down to half the interval and never count them as strikes: with
gRPC's default server policy (pings without data at most every 5 minutes, 2 strikes) the
long-lived streams between stages, which mostly wait, were torn down with GOAWAY
``too_many_pings`` after a minute or two.

Peers speak TLS by default, authenticated by the cluster token alone (``tls.py`` has the
protocol); ``--insecure-peers`` falls back to plain TCP with the token in every call's
metadata, for a trusted LAN.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc

from molink import envs
from molink.transport import tls
from molink.transport.auth import TokenAuthInterceptor, token_metadata
from molink.transport.codec import MAX_MESSAGE_BYTES

OPEN_TIMEOUT_S = 5.0


class PeerUnreachable(ConnectionError):
    """A peer could not be reached, or could not prove it holds the cluster token.
    ``retryable``: it may work later (nothing answered); else the peer answered and failed
    a check (token, certificate, TLS on one side only), which retrying will not fix."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclasses.dataclass(frozen=True)
class PeerSecurity:
    """How this node talks to its peers: the cluster token, and its TLS identity (None:
    plain TCP, ``--insecure-peers``)."""

    token: str
    identity: tls.NodeIdentity | None

    @classmethod
    def create(cls, token: str, insecure: bool = False,
               state_dir: Path | None = None) -> PeerSecurity:
        """This node's security: its identity is loaded from (or made in) the state dir."""
        if insecure:
            return cls(token, None)
        return cls(token, tls.NodeIdentity.load_or_create(state_dir))

    @property
    def fingerprint(self) -> str:
        """This node's certificate fingerprint ("" without TLS)."""
        return self.identity.fingerprint if self.identity else ""


def _common_options() -> list[tuple[str, int]]:
    keepalive_ms = int(envs.keepalive_s() * 1000)
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", max(500, keepalive_ms // 2)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options() -> list[tuple[str, int]]:
    """The server's side of the keepalive agreement: the clients' pings are welcome."""
    keepalive_ms = int(envs.keepalive_s() * 1000)
    return _common_options() + [
        ("grpc.http2.min_recv_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.http2.max_ping_strikes", 0),  # 0: no limit
    ]


def channel_options() -> list[tuple[str, int]]:
    return _common_options() + [
        # Reconnect quickly after a peer restarts (gRPC's default backoff reaches 2 min).
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def make_server(security: PeerSecurity) -> grpc.aio.Server:
    """A server that refuses, before parsing anything, every call without the token."""
    if security.identity is None:
        return grpc.aio.server(interceptors=[TokenAuthInterceptor(security.token)],
                               options=server_options())
    server = grpc.aio.server(
        interceptors=[tls.ProofAuthInterceptor(security.token, security.identity)],
        options=server_options())
    tls.add_security_service(server, security.token, security.identity)
    return server


def bind(server: grpc.aio.Server, host: str, port: int, security: PeerSecurity) -> int:
    """Listen on host:port (port 0: the OS picks); returns the port."""
    address = f"{host}:{port}"
    if security.identity is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls.server_credentials(security.identity))
    if bound == 0:
        raise ValueError(f"cannot listen on {host}:{port} (address in use or not available)")
    return bound


class Peer:
    """A channel to one peer plus the metadata every call to it carries. Open it with
    ``await Peer.open(...)``: over TLS, the peer has proven it holds the cluster token
    (and, when ``expected_fingerprint`` is given, that it is that node) before anything
    else is sent."""

    def __init__(self, address: str, channel: grpc.aio.Channel, metadata, fingerprint: str):
        self.address = address
        self.channel = channel
        self.metadata = metadata
        self.fingerprint = fingerprint

    @classmethod
    async def open(cls, address: str, security: PeerSecurity,
                   expected_fingerprint: str = "", timeout_s: float = OPEN_TIMEOUT_S) -> Peer:
        """Raises PeerUnreachable with the reason."""
        if security.identity is None:
            channel = grpc.aio.insecure_channel(address, options=channel_options())
            return cls(address, channel, token_metadata(security.token), "")
        try:
            channel, fingerprint = await tls.open_secure_channel(
                address, security.token, expected_fingerprint=expected_fingerprint or None,
                options=channel_options(), timeout_s=timeout_s)
        except tls.PeerSecurityError as exc:
            text = str(exc)
            if "SSL" in text:  # something answered, but not TLS
                raise PeerUnreachable(f"{text} (is that node started with --insecure-peers? "
                                      "all nodes must agree)", retryable=False) from None
            nothing_answered = "cannot fetch" in text or "did not answer" in text
            raise PeerUnreachable(text, retryable=nothing_answered) from None
        return cls(address, channel, tls.proof_metadata(security.token, fingerprint),
                   fingerprint)

    async def close(self) -> None:
        await self.channel.close()


def peer_host(peer: str) -> str:
    """The IP address in a gRPC peer string: 'ipv4:10.0.0.2:5123' -> '10.0.0.2',
    'ipv6:[::1]:5123' -> '[::1]' (bracketed, ready for 'HOST:PORT'); '' if unknown."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        host = host.replace("%5B", "[").replace("%5D", "]")
        return host if host.startswith("[") else f"[{host}]"
    return ""


def error_detail(exc: Exception) -> str:
    """What went wrong with a call to a peer, in words (a gRPC status's details, else the
    exception's message, else its type)."""
    detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    return detail or type(exc).__name__
