"""TLS in front of a gRPC server, asking for a client certificate without requiring one.

istiod's 15012 uses Go's VerifyClientCertIfGiven: token callers connect without a certificate, node
agents and VMs may present one. grpcio's Python server cannot ask for an optional client certificate
(its SSL credentials either never request one or require one), so this front terminates TLS itself
(CERT_OPTIONAL, chain verified against our roots) and relays the bytes to the gRPC server on a loopback
port. Each relayed connection comes from a distinct local port; `peer()` maps the address gRPC reports
back to the TLS facts of that connection. Connections that did not come through the front are unknown,
and servicers must refuse them, so nothing reaches the internal port around the TLS check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class TlsPeer:
    """What the TLS handshake established about one client connection."""

    address: str
    cert_pem: bytes | None  # leaf certificate, verified against our roots; None if the client sent none


def _der_to_pem(der: bytes) -> bytes:
    return ssl.DER_cert_to_PEM_cert(der).encode()


class TlsFront:
    def __init__(self, host: str, port: int, backend_port: int, context_factory: Callable[[], ssl.SSLContext]):
        self._host = host
        self._port = port
        self.backend_port = backend_port
        self._context_factory = context_factory
        self._context = context_factory()
        self._server: asyncio.Server | None = None
        self._peers: dict[int, TlsPeer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def reload(self) -> None:
        """Pick up a renewed serving certificate or trust bundle for new handshakes."""
        self._context = self._context_factory()  # _accept reads it per connection

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    def peer(self, grpc_peer: str) -> TlsPeer | None:
        """The TLS peer behind a gRPC `context.peer()` string such as 'ipv4:127.0.0.1:43210'."""
        host, _, port = grpc_peer.rpartition(":")
        if host not in ("ipv4:127.0.0.1", "ipv6:[::1]", "ipv6:%5B::1%5D"):
            return None
        try:
            return self._peers.get(int(port))
        except ValueError:
            return None

    async def start(self) -> None:
        # The listening context only dispatches: its SNI callback (run for every ClientHello, with or
        # without SNI) switches the connection to the current context, so a reload applies to new clients.
        listener = self._context_factory()

        def use_current(ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            ssl_object.context = self._context

        listener.sni_callback = use_current
        self._server = await asyncio.start_server(
            self._accept, self._host, self._port, ssl=listener, ssl_handshake_timeout=10, reuse_address=True
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # Closing both ends makes every relay see EOF and finish on its own (no cancellation noise).
        for w in list(self._writers):
            w.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        host, port = writer.get_extra_info("peername")[:2]
        client = f"{host}:{port}"
        backend_writer: asyncio.StreamWriter | None = None
        local_port = 0
        self._writers.add(writer)
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
            self._writers.add(backend_writer)
            local_port = backend_writer.get_extra_info("sockname")[1]
            # Registered before the first byte is relayed, removed before the socket closes.
            self._peers[local_port] = TlsPeer(client, _der_to_pem(der) if der else None)
            await asyncio.gather(_pump(reader, backend_writer), _pump(backend_reader, writer))
        except (ConnectionError, OSError) as err:
            log.debug("relay for %s ended: %s", client, err)
        finally:
            self._peers.pop(local_port, None)
            for w in (backend_writer, writer):
                if w is not None:
                    w.close()
                    self._writers.discard(w)
            self._tasks.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    finally:
        if writer.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()


def server_context(cert_chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    """TLS 1.2+ server context: our serving cert, optional client certs verified against our roots, h2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=roots_pem.decode())
    # load_cert_chain reads files only; the key goes through a private temp file that is removed at once.
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
        cert_file.write_bytes(cert_chain_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)
        ctx.load_cert_chain(cert_file, key_file)
    return ctx
