"""A TCP relay for the multi-host tests, run inside a host namespace (stdlib + molink).

    python relay.py plain LISTEN_PORT TARGET_HOST:PORT RECORD_FILE
    python relay.py impostor LISTEN_PORT RECORD_FILE

``plain`` forwards bytes both ways and appends everything it forwards to RECORD_FILE: what
an eavesdropper on the link sees. ``impostor`` is a man-in-the-middle that terminates TLS
with a certificate of its own and records whatever a client sends it after the handshake.
Prints "listening" once it accepts connections.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import tempfile
from pathlib import Path


async def pipe(reader, writer, record) -> None:
    try:
        while data := await reader.read(65536):
            record.write(data)
            record.flush()
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def plain(port: int, target: str, record_path: str) -> None:
    host, _, target_port = target.rpartition(":")
    record = open(record_path, "ab")

    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(target_port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer, record), pipe(up_reader, writer, record))

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    print("listening", flush=True)
    await server.serve_forever()


async def impostor(port: int, record_path: str) -> None:
    from molink.transport.tls import NodeIdentity

    identity = NodeIdentity.ephemeral()
    directory = Path(tempfile.mkdtemp())
    (directory / "cert.pem").write_bytes(identity.cert_pem)
    (directory / "key.pem").write_bytes(identity.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    context.set_alpn_protocols(["h2"])
    record = open(record_path, "ab")

    async def handle(reader, writer):
        try:
            while data := await reader.read(65536):
                record.write(data)
                record.flush()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port, ssl=context)
    print("listening", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "plain":
        asyncio.run(plain(int(sys.argv[2]), sys.argv[3], sys.argv[4]))
    else:
        asyncio.run(impostor(int(sys.argv[2]), sys.argv[3]))
