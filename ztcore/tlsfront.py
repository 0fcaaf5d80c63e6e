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
import logging
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsPeer:
    """What the TLS handshake established about one client connection."""

    address: str
    cert_pem: bytes | None  # leaf certificate, verified against our roots; None if the client sent none


def _der_to_pem(der: bytes) -> bytes:
    return ssl.DER_cert_to_PEM_cert(der).encode()


class _Side(asyncio.Protocol):
    """One end of a relay: bytes received here are written to the other end, with back-pressure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.on_lost: Callable[[], None] | None = None
        self.is_tls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Read once here: a closing SSL transport cannot answer get_extra_info any more.
        self.is_tls = transport.get_extra_info("sslcontext") is not None

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)

    def eof_received(self) -> bool | None:
        if self.other is not None and self.other.transport is not None and self.other.transport.can_write_eof():
            self.other.transport.write_eof()
            # Half-close: keep our write side open until the other end finishes (TLS cannot half-close).
            return None if self.is_tls else True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_lost is not None:
            self.on_lost()
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    # The other end's socket buffer is full: stop reading here until it drains.
    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class TlsFront:
    def __init__(self, host: str, port: int, backend_port: int, context_factory: Callable[[], ssl.SSLContext]):
        self._host = host
        self._port = port
        self.backend_port = backend_port
        self._context_factory = context_factory
        self._context = context_factory()
        self._server: asyncio.Server | None = None
        self._peers: dict[int, TlsPeer] = {}
        self._sides: set[_Side] = set()
        self._pending: set[asyncio.Task[None]] = set()

    def reload(self) -> None:
        """Pick up a renewed serving certificate or trust bundle for new handshakes."""
        self._context = self._context_factory()

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
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._client_side, self._host, self._port, ssl=listener, ssl_handshake_timeout=10, reuse_address=True
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pending):
            task.cancel()
        for side in list(self._sides):
            if side.transport is not None:
                side.transport.close()
        if self._pending:
            await asyncio.wait(self._pending, timeout=2)
        if self._server is not None:
            await self._server.wait_closed()

    def _client_side(self) -> _Side:
        side = _ClientSide(self)
        return side

    def _connected(self, client: _Side) -> None:
        """TLS is up: pause the client, dial the backend, register the peer, then relay."""
        assert client.transport is not None
        client.transport.pause_reading()
        self._sides.add(client)
        task = asyncio.get_running_loop().create_task(self._dial(client))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _dial(self, client: _Side) -> None:
        assert client.transport is not None
        host, port = client.transport.get_extra_info("peername")[:2]
        ssl_object = client.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        backend = _Side()
        try:
            await asyncio.get_running_loop().create_connection(lambda: backend, "127.0.0.1", self.backend_port)
        except OSError as err:
            log.warning("TLS front cannot reach its gRPC server: %s", err)
            client.transport.close()
            return
        assert backend.transport is not None
        local_port = backend.transport.get_extra_info("sockname")[1]
        # Registered before the first byte is relayed, removed when either end goes away.
        self._peers[local_port] = TlsPeer(f"{host}:{port}", _der_to_pem(der) if der else None)
        self._sides.add(backend)

        def forget() -> None:
            self._peers.pop(local_port, None)
            self._sides.discard(backend)
            self._sides.discard(client)

        backend.on_lost = client.on_lost = forget
        client.other, backend.other = backend, client
        if client.transport.is_closing():
            backend.transport.close()
            return
        client.transport.resume_reading()


class _ClientSide(_Side):
    def __init__(self, front: TlsFront) -> None:
        super().__init__()
        self._front = front

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._front._connected(self)


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
