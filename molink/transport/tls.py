"""Encrypted, mutually authenticated links between peers, from the cluster token alone.

There is no PKI. Every node has a self-signed certificate (ECDSA P-256, its own trust
root) kept in a state directory; it is identified by the SHA-256 of the certificate's DER,
its *fingerprint*. A client connects in three steps:

1. It fetches the server's certificate with an unverified TLS handshake (trust on first
   use), or checks it against a fingerprint it was given (``expected_fingerprint``).
2. It opens a gRPC channel whose only trust root is that exact certificate, so every TLS
   connection of the channel, including the reconnections gRPC makes by itself, reaches
   the holder of that certificate's private key, or fails its handshake.
3. Before any payload, it sends a fresh 32-byte nonce to ``molink.Security/Prove``; the
   server answers ``HMAC(token, "molink-server-v1|" + its fingerprint + "|" + nonce)``.

Every call (``Prove`` included) carries ``x-molink-proof = HMAC(token, "molink-client-v1|"
+ server fingerprint)``; servers compute it over their *own* fingerprint and refuse a
mismatch with ``UNAUTHENTICATED`` before parsing the payload. The token never travels.

Why a man-in-the-middle is refused: to read the traffic it must terminate TLS with a
certificate of its own (it lacks the server's key), whose fingerprint differs from the
server's. The client proof it receives is bound to that fingerprint, so the real server
refuses it; and it cannot answer the client's challenge for its fingerprint without the
token, so the client refuses it, before sending anything but the nonce and that useless
proof. A relay that only forwards bytes sees nothing but TLS records.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import logging
import os
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from molink import envs
from molink.transport.auth import _refusal_handler

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock instead
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

logger = logging.getLogger(__name__)

CERT_FILE = "node-cert.pem"
KEY_FILE = "node-key.pem"
NODE_NAME = "molink-node"  # CN and DNS SAN of every node's certificate
PROOF_METADATA_KEY = "x-molink-proof"
PROVE_METHOD = "/molink.Security/Prove"
NONCE_BYTES = 32
CERT_VALIDITY = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(days=1)  # certificates are valid from a day ago
# Channel options a channel pinned by ``channel_credentials`` needs.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.ssl_target_name_override", NODE_NAME),)


class PeerSecurityError(Exception):
    """A peer could not be reached securely, or failed to prove it knows the token."""


def fingerprint_of(cert_pem: bytes) -> str:
    """SHA-256 hex of the certificate's DER."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class NodeIdentity:
    """A node's self-signed certificate and private key (PEM)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", fingerprint_of(self.cert_pem))

    @classmethod
    def ephemeral(cls) -> NodeIdentity:
        """A new identity held in memory only."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_NAME)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NODE_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False,
                              key_agreement=False, crl_sign=False, encipher_only=False,
                              decipher_only=False),
                critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(cert.public_bytes(serialization.Encoding.PEM), key_pem)

    @classmethod
    def load_or_create(cls, state_dir: Path | None = None) -> NodeIdentity:
        """The identity kept in ``state_dir`` (default: ``default_state_dir()``), made there
        on first use. Safe when several processes share the directory."""
        state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
        with open(state_dir / ".identity.lock", "a+") as lock:
            _lock_exclusively(lock)
            # The certificate is written last: its presence means the pair is complete.
            if not cert_path.exists():
                identity = cls.ephemeral()
                _write_atomically(key_path, identity.key_pem, 0o600)
                _write_atomically(cert_path, identity.cert_pem, 0o644)
                logger.info("made node identity %s in %s", identity.fingerprint[:16], state_dir)
                return identity
        if not key_path.exists():
            raise PeerSecurityError(f"{cert_path} has no private key {key_path}: remove the "
                                    "certificate to make a new identity")
        if os.name != "nt" and key_path.stat().st_mode & 0o077:  # Windows: ACLs, not modes
            logger.warning("%s is readable by other users; run chmod 600 on it", key_path)
        identity = cls(cert_path.read_bytes(), key_path.read_bytes())
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        key = serialization.load_pem_private_key(identity.key_pem, password=None)
        cert_key = x509.load_pem_x509_certificate(identity.cert_pem).public_key()
        if key.public_key().public_bytes(*spki) != cert_key.public_bytes(*spki):
            raise PeerSecurityError(f"{key_path} is not the key of {cert_path}")
        return identity


def default_state_dir() -> Path:
    """``$MOLINK_STATE_DIR``, else ``%LOCALAPPDATA%\\molink`` on Windows, else
    ``~/.local/state/molink``."""
    if envs.state_dir():
        return Path(envs.state_dir())
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "molink"
    return Path.home() / ".local" / "state" / "molink"


def _lock_exclusively(handle) -> None:
    """Hold an exclusive lock on ``handle`` until it is closed (POSIX flock; Windows: a lock
    on its first byte, retried while another process holds it)."""
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return
    if msvcrt is not None:
        handle.seek(0)
        while True:
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # tries for ~10 s
                return
            except OSError:
                continue


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        if hasattr(os, "fchmod"):  # not on Windows
            os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---------------------------------------------------------------- proofs


def client_proof(token: str, server_fingerprint: str) -> str:
    return hmac.new(token.encode(), b"molink-client-v1|" + server_fingerprint.encode(),
                    hashlib.sha256).hexdigest()


def server_proof(token: str, fingerprint: str, nonce: bytes) -> str:
    return hmac.new(token.encode(), b"molink-server-v1|" + fingerprint.encode() + b"|" + nonce,
                    hashlib.sha256).hexdigest()


def proof_metadata(token: str, server_fingerprint: str) -> tuple[tuple[str, str], ...]:
    """The metadata every call to the server of that fingerprint carries."""
    return ((PROOF_METADATA_KEY, client_proof(token, server_fingerprint)),)


# ---------------------------------------------------------------- server side


def server_credentials(identity: NodeIdentity) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)],
                                       require_client_auth=False)


class ProofAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, before parsing any payload, calls whose ``x-molink-proof`` is not the
    client proof for this server's own fingerprint."""

    def __init__(self, token: str, identity: NodeIdentity) -> None:
        self._expected = client_proof(token, identity.fingerprint).encode()

    async def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        presented = metadata.get(PROOF_METADATA_KEY, "")
        if isinstance(presented, str) and hmac.compare_digest(presented.encode(),
                                                              self._expected):
            return await continuation(handler_call_details)
        logger.warning("refused %s: wrong or missing cluster token proof",
                       handler_call_details.method)
        return _refusal_handler(await continuation(handler_call_details))


def add_security_service(server: grpc.aio.Server, token: str, identity: NodeIdentity) -> None:
    """Registers ``molink.Security/Prove``: 32 raw bytes of nonce in, the hex server proof
    (ASCII bytes) out."""

    async def prove(nonce: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if len(nonce) != NONCE_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the nonce must be {NONCE_BYTES} bytes, not {len(nonce)}")
        return server_proof(token, identity.fingerprint, nonce).encode()

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "molink.Security", {"Prove": grpc.unary_unary_rpc_method_handler(prove)}),))


# ---------------------------------------------------------------- client side


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port)."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
        if ":" in host:
            sep = ""
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PeerSecurityError(f"cannot fetch the TLS certificate of {address}: not a "
                                "host:port address (write IPv6 ones as [addr]:port)")
    return host, int(port)


async def fetch_certificate(address: str, timeout_s: float) -> bytes:
    """The PEM certificate ``address`` presents, fetched without verifying it."""
    host, port = split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port, ssl=context,
                                                      server_hostname=NODE_NAME)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        if not der:
            raise PeerSecurityError(f"cannot fetch the TLS certificate of {address}: "
                                    "it presented none")
        return ssl.DER_cert_to_PEM_cert(der).encode()
    except (OSError, TimeoutError, ssl.SSLError) as e:
        reason = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
        raise PeerSecurityError(f"cannot fetch the TLS certificate of {address}: {reason}") from e
    finally:
        if writer is not None:
            writer.transport.abort()  # no TLS shutdown to wait for


def channel_credentials(server_cert_pem: bytes) -> grpc.ChannelCredentials:
    """Credentials trusting that certificate alone; use with ``CHANNEL_OPTIONS``."""
    return grpc.ssl_channel_credentials(root_certificates=server_cert_pem)


async def open_secure_channel(
    address: str,
    token: str,
    *,
    expected_fingerprint: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
    timeout_s: float = 5.0,
) -> tuple[grpc.aio.Channel, str]:
    """(channel pinned to the certificate of ``address``, its fingerprint), once the server
    has proven it knows ``token``. Calls on the channel must carry
    ``proof_metadata(token, fingerprint)``."""
    cert_pem = await fetch_certificate(address, timeout_s)
    fingerprint = fingerprint_of(cert_pem)
    if expected_fingerprint is not None and fingerprint != expected_fingerprint.lower():
        raise PeerSecurityError(f"{address} presents certificate {fingerprint[:16]}, not the "
                                f"expected {expected_fingerprint[:16].lower()}")
    channel = grpc.aio.secure_channel(address, channel_credentials(cert_pem),
                                      options=[*options, *CHANNEL_OPTIONS])
    try:
        await _check_server_proof(channel, address, token, fingerprint, timeout_s)
    except BaseException:
        await channel.close()
        raise
    return channel, fingerprint


async def _check_server_proof(channel: grpc.aio.Channel, address: str, token: str,
                              fingerprint: str, timeout_s: float) -> None:
    nonce = secrets.token_bytes(NONCE_BYTES)
    prove = channel.unary_unary(PROVE_METHOD)
    try:
        answer = await prove(nonce, metadata=proof_metadata(token, fingerprint),
                             timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise PeerSecurityError(f"{address} refused this node's proof of the cluster "
                                    f"token: {e.details()}") from e
        raise PeerSecurityError(f"{address} (certificate {fingerprint[:16]}) did not answer "
                                f"the security challenge: {e.code().name}: {e.details()}") from e
    expected = server_proof(token, fingerprint, nonce).encode()
    if not (isinstance(answer, bytes) and hmac.compare_digest(answer, expected)):
        raise PeerSecurityError(f"{address} does not know the cluster token (or a "
                                f"man-in-the-middle presents certificate {fingerprint[:16]})")
