"""TLS between peers from the cluster token alone: pinned self-signed certificates, proofs of
the token bound to the server's fingerprint in both directions, refusal of impostors and
men-in-the-middle, encryption seen from a relay, identities kept on disk."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import stat

import grpc
import pytest

from molink import envs
from molink.transport import auth, tls
from molink.transport.tls import NodeIdentity, PeerSecurityError

TOKEN = "tls-test-token-7f3a"
MARKER = b"PAYLOAD-MARKER-91c2e5"
ECHO = "/test.Echo/Echo"
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100),
                  ("grpc.min_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 300)]


class _Node:
    """A grpc.aio server with TLS, the security service and an echo method."""

    def __init__(self, identity: NodeIdentity, token: str = TOKEN, *,
                 check_proof: bool = True, prove_token: str | None = None) -> None:
        self.identity = identity
        self.echoed: list[bytes] = []
        interceptors = [tls.ProofAuthInterceptor(token, identity)] if check_proof else []
        self.server = grpc.aio.server(interceptors=interceptors)
        tls.add_security_service(self.server, prove_token or token, identity)

        async def echo(request: bytes, context) -> bytes:
            self.echoed.append(request)
            return request

        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.port = self.server.add_secure_port(f"{host}:{port}",
                                                tls.server_credentials(self.identity))
        assert self.port
        await self.server.start()
        return self.port

    async def stop(self) -> None:
        await self.server.stop(None)


@contextlib.asynccontextmanager
async def _running(*nodes: _Node):
    try:
        for node in nodes:
            if not hasattr(node, "port"):
                await node.start()
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


class _Relay:
    """Forwards TCP connections to 127.0.0.1:target, recording the bytes it sees. With
    ``ssl_in``/``ssl_out`` it terminates TLS on both sides: a man-in-the-middle."""

    def __init__(self, target: int, ssl_in: ssl.SSLContext | None = None,
                 ssl_out: ssl.SSLContext | None = None) -> None:
        self.target, self.ssl_in, self.ssl_out = target, ssl_in, ssl_out
        self.seen = bytearray()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl_in)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader, writer) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.target, ssl=self.ssl_out,
                server_hostname=tls.NODE_NAME if self.ssl_out else None)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.transport.abort()

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                self.seen += data
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.transport.abort()


async def _echo(channel: grpc.aio.Channel, metadata, payload: bytes = MARKER, **kwargs) -> bytes:
    return await channel.unary_unary(ECHO)(payload, metadata=metadata, timeout=5, **kwargs)


def test_echo_over_a_secure_channel():
    async def scenario():
        async with _running(_Node(NodeIdentity.ephemeral())) as (node,):
            channel, fingerprint = await tls.open_secure_channel(f"127.0.0.1:{node.port}", TOKEN)
            try:
                assert fingerprint == node.identity.fingerprint
                reply = await _echo(channel, tls.proof_metadata(TOKEN, fingerprint))
            finally:
                await channel.close()
            assert reply == MARKER and node.echoed == [MARKER]

    asyncio.run(scenario())


def test_a_client_with_the_wrong_token_is_refused():
    async def scenario():
        async with _running(_Node(NodeIdentity.ephemeral())) as (node,):
            address = f"127.0.0.1:{node.port}"
            with pytest.raises(PeerSecurityError, match="refused"):
                await tls.open_secure_channel(address, "not-the-token")
            # Raw calls on a channel pinned to the right certificate: wrong, missing proof.
            channel, fingerprint = await tls.open_secure_channel(address, TOKEN)
            try:
                for metadata in (tls.proof_metadata("not-the-token", fingerprint), (),
                                 auth.token_metadata(TOKEN)):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await _echo(channel, metadata)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert refused.value.details() == auth.REFUSAL
                # The challenge takes exactly 32 bytes.
                with pytest.raises(grpc.aio.AioRpcError) as bad_nonce:
                    await channel.unary_unary(tls.PROVE_METHOD)(
                        b"short", metadata=tls.proof_metadata(TOKEN, fingerprint), timeout=5)
                assert bad_nonce.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            finally:
                await channel.close()
            assert node.echoed == []

    asyncio.run(scenario())


def test_a_server_that_does_not_know_the_token_is_refused_by_the_client():
    async def scenario():
        # An impostor that accepts every client but cannot prove the token.
        impostor = _Node(NodeIdentity.ephemeral(), check_proof=False, prove_token="guess")
        honest_other = _Node(NodeIdentity.ephemeral(), token="other-cluster")
        async with _running(impostor, honest_other):
            with pytest.raises(PeerSecurityError, match="does not know the cluster token") as e:
                await tls.open_secure_channel(f"127.0.0.1:{impostor.port}", TOKEN)
            assert impostor.identity.fingerprint[:16] in str(e.value)
            with pytest.raises(PeerSecurityError, match="refused"):
                await tls.open_secure_channel(f"127.0.0.1:{honest_other.port}", TOKEN)
            assert impostor.echoed == honest_other.echoed == []

    asyncio.run(scenario())


def test_another_identity_with_the_same_token_fails_the_expected_fingerprint():
    async def scenario():
        async with _running(_Node(NodeIdentity.ephemeral()),
                            _Node(NodeIdentity.ephemeral())) as (first, second):
            expected = first.identity.fingerprint
            channel, _ = await tls.open_secure_channel(f"127.0.0.1:{first.port}", TOKEN,
                                                       expected_fingerprint=expected.upper())
            await channel.close()
            with pytest.raises(PeerSecurityError) as e:
                await tls.open_secure_channel(f"127.0.0.1:{second.port}", TOKEN,
                                              expected_fingerprint=expected)
            message = str(e.value)
            assert f"127.0.0.1:{second.port}" in message
            assert expected[:16] in message and second.identity.fingerprint[:16] in message

    asyncio.run(scenario())


def test_a_byte_relay_works_and_sees_only_ciphertext():
    async def scenario():
        async with _running(_Node(NodeIdentity.ephemeral())) as (node,):
            relay = _Relay(node.port)
            await relay.start()
            try:
                channel, fingerprint = await tls.open_secure_channel(
                    f"127.0.0.1:{relay.port}", TOKEN,
                    expected_fingerprint=node.identity.fingerprint)
                try:
                    proof = tls.proof_metadata(TOKEN, fingerprint)
                    assert await _echo(channel, proof, MARKER * 100) == MARKER * 100
                finally:
                    await channel.close()
            finally:
                await relay.stop()
            seen = bytes(relay.seen)
            assert len(seen) > len(MARKER) * 100
            for secret in (MARKER, TOKEN.encode(), proof[0][1].encode(), b"x-molink-proof"):
                assert secret not in seen

    asyncio.run(scenario())


def test_a_tls_terminating_man_in_the_middle_is_refused(tmp_path):
    async def scenario():
        mitm = NodeIdentity.ephemeral()
        (tmp_path / "cert.pem").write_bytes(mitm.cert_pem)
        (tmp_path / "key.pem").write_bytes(mitm.key_pem)
        ssl_in = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_in.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
        ssl_in.set_alpn_protocols(["h2"])
        ssl_out = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ssl_out.check_hostname, ssl_out.verify_mode = False, ssl.CERT_NONE
        ssl_out.set_alpn_protocols(["h2"])
        async with _running(_Node(NodeIdentity.ephemeral())) as (node,):
            relay = _Relay(node.port, ssl_in, ssl_out)
            await relay.start()
            try:
                # Trusting the first certificate seen is the MITM's; the real server refuses
                # the proof bound to it, so nothing but the challenge reaches the server.
                with pytest.raises(PeerSecurityError, match="refused"):
                    await tls.open_secure_channel(f"127.0.0.1:{relay.port}", TOKEN)
                # Expecting the server's fingerprint: refused before any call.
                with pytest.raises(PeerSecurityError, match=mitm.fingerprint[:16]):
                    await tls.open_secure_channel(f"127.0.0.1:{relay.port}", TOKEN,
                                                  expected_fingerprint=node.identity.fingerprint)
            finally:
                await relay.stop()
            assert relay.seen, "the MITM relayed the plaintext of the challenge"
            assert TOKEN.encode() not in relay.seen
            assert node.echoed == []

    asyncio.run(scenario())


def test_reconnections_reach_only_the_pinned_certificate():
    async def scenario():
        identity = NodeIdentity.ephemeral()
        first = _Node(identity)
        port = await first.start()
        channel, fingerprint = await tls.open_secure_channel(f"127.0.0.1:{port}", TOKEN,
                                                             options=FAST_RECONNECT)
        proof = tls.proof_metadata(TOKEN, fingerprint)
        try:
            assert await _echo(channel, proof) == MARKER
            await first.stop()
            # Another certificate on the same port, accepting any call: the handshake fails.
            other = _Node(NodeIdentity.ephemeral(), check_proof=False)
            await other.start(port=port)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await channel.unary_unary(ECHO)(MARKER, metadata=proof, timeout=1.5,
                                                    wait_for_ready=True)
                assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                               grpc.StatusCode.DEADLINE_EXCEEDED)
                assert other.echoed == []
            finally:
                await other.stop()
            # The same identity back on that port: the channel reconnects.
            again = _Node(identity)
            await again.start(port=port)
            try:
                assert await _echo(channel, proof, wait_for_ready=True) == MARKER
            finally:
                await again.stop()
        finally:
            await channel.close()

    asyncio.run(scenario())


def test_the_identity_is_kept_in_the_state_directory(tmp_path, monkeypatch):
    state = tmp_path / "state"
    made = NodeIdentity.load_or_create(state)
    assert stat.S_IMODE((state / tls.KEY_FILE).stat().st_mode) == 0o600
    assert (state / tls.CERT_FILE).read_bytes() == made.cert_pem
    assert NodeIdentity.load_or_create(state).fingerprint == made.fingerprint
    monkeypatch.setenv(envs.STATE_DIR_VAR, str(state))
    assert NodeIdentity.load_or_create().fingerprint == made.fingerprint
    assert NodeIdentity.ephemeral().fingerprint != made.fingerprint
    assert "PRIVATE" not in repr(made)
    (state / tls.KEY_FILE).write_bytes(NodeIdentity.ephemeral().key_pem)
    with pytest.raises(PeerSecurityError, match="is not the key of"):
        NodeIdentity.load_or_create(state)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_fetch_certificate_addresses_and_errors():
    async def scenario():
        async with _running(_Node(NodeIdentity.ephemeral())) as (node,):
            pem = await tls.fetch_certificate(f"localhost:{node.port}", 5)
            assert tls.fingerprint_of(pem) == node.identity.fingerprint
        if _has_ipv6_loopback():
            v6 = _Node(NodeIdentity.ephemeral())
            await v6.start(host="[::1]")
            async with _running(v6):
                channel, fingerprint = await tls.open_secure_channel(f"[::1]:{v6.port}", TOKEN)
                try:
                    assert await _echo(channel, tls.proof_metadata(TOKEN, fingerprint)) == MARKER
                finally:
                    await channel.close()
        for address in ("no-port", "::1:80", "[::1]", "host:port", "host:0"):
            with pytest.raises(PeerSecurityError, match="cannot fetch the TLS certificate"):
                await tls.fetch_certificate(address, 1)
        with pytest.raises(PeerSecurityError,
                           match=r"cannot fetch the TLS certificate of 127\.0\.0\.1:\d+: "):
            await tls.fetch_certificate(f"127.0.0.1:{_free_port()}", 1)

    asyncio.run(scenario())


def test_fetch_certificate_times_out_on_a_silent_peer():
    async def scenario():
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        try:
            with pytest.raises(PeerSecurityError, match="timed out"):
                await tls.fetch_certificate(f"127.0.0.1:{port}", 0.3)
        finally:
            silent.close()

    asyncio.run(scenario())
