"""One TLS 1.3 handshake per tunnel between two bridges, and the SPI exchange that follows inside it.

On the wire (TCP from the initiator's bridge to the responder's, port --port), two round trips, as many as the
TLS 1.3 handshake itself takes:

    I -> R  preamble "ZTB1" kind scope len + JSON {src, dst, key_bytes, rev: 2} (cleartext), and in the same
            segment the TLS ClientHello
    R -> I  announce: byte 2, spi_r (4 bytes), flags (1 byte; bit 0: R's SAs can carry 64-bit sequence numbers,
            false behind an offload device without ESN), then the TLS 1.3 server flight -- or, instead of both,
            a refusal: byte 1 + reason ("10.2.0.9 is not a mesh pod ...")
    I -> R  TLS client Finished and, in the same flight, ready {spi_i, esn, peer_spi, peer_esn}. I verified R's
            certificate (below) before choosing spi_i; it derived the keys and installed its inbound SA. esn: the
            tunnel's choice, ESN only if both sides can (both SAs of both sides follow it); peer_spi, peer_esn:
            the announce as I read it, so that R sees one altered on the way and refuses (an altered SPI would
            give different keys anyway; an altered ESN bit would only turn ESN off, unseen without the echo)
    R -> I  done   R verified I, derived the keys, installed its inbound and outbound SAs (and its policies,
                   unless the installer defers them); its close_notify follows in the same write
    then I installs its outbound SA (and policies). zt-bridge defers the pair policies on both sides until the
    exchange is over: its deadline bounds the exchange, not a node tunnel's thousands of policies.

Verification: both sides present a certificate (the initiator A's SVID, the responder B's, or in node scope
each bridge's own) and verify the peer's chain against the mesh roots; each then checks that the peer's
SPIFFE ID is the identity WDS holds for the address it claims and that policy admits the pair. A side that
finds otherwise sends reject {reason} (the initiator with its Finished, instead of ready) and closes.

SPIs: each side chooses its inbound SPI at random (`Installer.propose_spi`, no kernel state) and the kernel
reserves it only with the inbound SA itself (NEWSA, refused if that SPI is live), so an announce costs the
responder nothing before it has verified the initiator. Each side installs a key only after it has verified
the peer: the initiator's inbound SA can exist before the responder has verified the initiator (keyed from a
session only the verified responder shares), and goes if the responder refuses. Each side installs its
outbound SA only after the peer's inbound SA for it exists, so no packet is ever sent under an SPI the
receiver cannot decrypt. The keys come from the TLS exporter (`ipsec_bridge.keys`), bound to both addresses,
both SPIs and the key size: a preamble or announce altered on the way yields different keys on the two
sides, never a weaker tunnel. A second preamble kind (answered by a status byte) asks the pair's initiator to
rekey now.

Revision 1 (bridges before the announce; a responder knows one by a preamble without "rev", an initiator by a
server flight without an announce) takes a round trip more: after the client Finished, R -> I accept {spi_r,
esn} (R reserved spi_r with ALLOCSPI once it had verified I), I -> R ready {spi_i, esn} (I reserved spi_i, keyed,
installed its inbound SA), R -> I done. Both sides still speak it.

Idle teardown (on-demand set-up, `ipsec_bridge.tunnels.ondemand`): a third preamble kind asks the peer to remove an
idle pair together with this side, naming the generation by its SPIs (as the sender sees them). The peer answers
with a status byte and a reason: KEEP (it saw bytes, runs a handshake, or sets tunnels up eagerly: nothing goes on
either side), ABSENT (it has no such generation: the asker removes its own), or STOPPED: it removed its out policies
(it sends nothing more under the pair's SAs, its traffic falls to its trap) and keeps its inbound SA until the asker
has removed everything and sent one more byte (done). So neither side ever sends under an SA the other no longer
has. A bridge that predates the kind closes the connection or refuses the preamble (status 1): the asker falls back
to removing its own side alone.

TLS runs on the event loop through memory BIOs, do_handshake included: a step's crypto (an ECDHE, a P-256
signature, a chain and signature check) is a fraction of a millisecond, less than the worker-thread hop it used to
take (0.7-0.9 ms in UML, five per handshake: bench/thread_hop.py), and there is no IO in it.

Resumption. A rekey, or the re-establishment of a recently removed pair, may resume the TLS session of an
earlier handshake with the same peer bridge and identity pair (`Plan.ticket`): RFC 8446 PSK with psk_dhe_ke
only, so every generation still runs a fresh ECDHE (forward secrecy) while neither side signs anything.
OpenSSL offers only psk_dhe_ke unless SSL_OP_ALLOW_NO_DHE_KEX is set (never here), and `TlsChannel` checks
the ServerHello of every resumed handshake for a key_share anyway. The keys come from the resumed session's
exporter with the same context as a full handshake's, so they are fresh. Before any SPI, each side checks the
certificate the session was made with exactly as after a full handshake (WDS identity, policy) plus its
expiry; a side that refuses a resumed session says so (`Reject.full`) and the initiator runs a full handshake
on a new connection. Tickets live in memory only (`TicketStore`, client side; the server's ticket keys live in
its SSL_CTX, which `ipsec_bridge.certs` replaces on renewal and every ticket lifetime).

The responder enforces the bounds too (`Plan.chains`, `ipsec_bridge.tickets.ResumptionChains`), so an initiator
that keeps offering tickets cannot resume forever: it refuses a resumed session (`Reject.full`) once the peer
bridge and identity pair had `max_resumptions` x `per_pair` resumptions (the initiator keeps up to `per_pair`
sessions of a pair, each with its own chain), or `max_age` seconds, since its last full handshake with them.
OpenSSL bounds each ticket by the context's timeout (`ticket_lifetime`) on the server as well (a client that
offers an expired ticket gets a full handshake), but it counts that lifetime from each ticket's issue, and a
resumption issues a new one: a chain of resumptions outlives it. What ends a chain on the server is that count,
that age and the context rotation (a ticket made under a replaced context cannot be decrypted).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import hashlib
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from ipsec_bridge.keys import (
    EXPORTER_LABEL,
    KEY_BYTES,
    Binding,
    DirectionalKeys,
    KeyDerivationError,
    KeyScope,
    exporter_context,
    exporter_length,
    split_keys,
)
from ipsec_bridge.xfrm.messages import Aead
from ztcore.identity import Identity, IdentityError

IPAddress = IPv4Address | IPv6Address

MAGIC = b"ZTB1"
REVISION = 2  # the announce (see the module docstring); a preamble without "rev" is revision 1
_PREAMBLE_HEAD = struct.Struct("!4sBBH")  # magic, kind, scope, JSON length
_ANNOUNCE = struct.Struct("!BIB")  # 2, the responder's inbound SPI, flags
_ANNOUNCE_TYPE = 2
_ANNOUNCE_ESN = 0x01
_FRAME = struct.Struct("!H")
MAX_PREAMBLE = 1024
MAX_FRAME = 4096
_READ_SIZE = 1 << 16


def small_reads(writer: asyncio.StreamWriter) -> None:
    """Have asyncio read this connection 64 KiB at a time, not 256 KiB: a buffer at or over glibc's mmap threshold
    (fixed at 128 KiB by ipsec_bridge.allocator) is mapped and unmapped around every read, three syscalls each
    (~60 us in UML), for handshake messages of a few KiB. (`max_size` is the selector transport's read size; other
    transports, and writers without a transport, keep their own.)"""
    transport: Any = getattr(writer, "transport", None)
    if hasattr(transport, "max_size"):
        transport.max_size = _READ_SIZE


class Kind(enum.IntEnum):
    HANDSHAKE = 1
    REKEY_REQUEST = 2
    TEARDOWN_REQUEST = 3  # on-demand idle reclaim: both bridges remove the pair together


class HandshakeError(Exception):
    """A handshake that produced no tunnel. `code` is a short label for metrics; the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- cleartext preamble -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Preamble:
    """What the initiator asks for: pod addresses in pod scope, node names in node scope."""

    kind: Kind
    scope: KeyScope
    src: str
    dst: str
    key_bytes: int = 16
    spis: tuple[int, int] | None = None  # teardown: the generation, (in, out) as the sender sees them
    revision: int = REVISION  # of the handshake the sender speaks (a handshake's responder answers in kind)

    def encode(self) -> bytes:
        fields: dict[str, Any] = {"src": self.src, "dst": self.dst, "key_bytes": self.key_bytes}
        if self.revision > 1:
            fields["rev"] = self.revision
        if self.spis is not None:
            fields["spi_in"], fields["spi_out"] = self.spis
        body = json.dumps(fields, separators=(",", ":")).encode()
        return _PREAMBLE_HEAD.pack(MAGIC, self.kind, self.scope, len(body)) + body

    def addresses(self) -> tuple[IPAddress, IPAddress]:
        """Pod scope: (src, dst) as addresses; HandshakeError when they are not."""
        try:
            return ip_address(self.src), ip_address(self.dst)
        except ValueError:
            raise HandshakeError("protocol", f"preamble names {self.src!r} -> {self.dst!r}, not addresses") from None


async def read_preamble(reader: asyncio.StreamReader) -> Preamble:
    try:
        head = await reader.readexactly(_PREAMBLE_HEAD.size)
    except asyncio.IncompleteReadError:
        raise HandshakeError("protocol", "connection closed before a complete preamble") from None
    magic, kind, scope, length = _PREAMBLE_HEAD.unpack(head)
    if magic != MAGIC:
        raise HandshakeError("protocol", "not a zt-bridge handshake (bad magic)")
    if length > MAX_PREAMBLE:
        raise HandshakeError("protocol", f"preamble of {length} bytes is too long")
    try:
        body = json.loads(await reader.readexactly(length))
        key_bytes = body.get("key_bytes", 16)
        if key_bytes not in KEY_BYTES:
            raise HandshakeError("protocol", f"unsupported key size {key_bytes!r} in the preamble")
        spis = (_spi(body["spi_in"]), _spi(body["spi_out"])) if "spi_in" in body or "spi_out" in body else None
        if Kind(kind) is Kind.TEARDOWN_REQUEST and spis is None:
            raise HandshakeError("protocol", "a teardown request must name the generation (spi_in, spi_out)")
        revision = body.get("rev", 1)
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
            raise HandshakeError("protocol", f"bad revision {revision!r} in the preamble")
        return Preamble(Kind(kind), KeyScope(scope), str(body["src"]), str(body["dst"]), int(key_bytes), spis,
                        min(revision, REVISION))  # fmt: skip
    except asyncio.IncompleteReadError:
        raise HandshakeError("protocol", "connection closed inside the preamble") from None
    except (ValueError, KeyError, TypeError):
        raise HandshakeError("protocol", "malformed preamble") from None


def status_ok() -> bytes:
    return b"\x00"


def status_refused(reason: str) -> bytes:
    raw = reason.encode()[:MAX_FRAME]
    return b"\x01" + _FRAME.pack(len(raw)) + raw


def announce(spi: int, esn: bool) -> bytes:
    """The responder's SPI and ESN ability, ahead of its TLS server flight (revision 2)."""
    return _ANNOUNCE.pack(_ANNOUNCE_TYPE, spi, _ANNOUNCE_ESN if esn else 0)


def parse_refusal(data: bytes) -> str | None:
    """The reason of a complete refusal at the start of `data`, or None while more bytes are needed."""
    if len(data) < 3:
        return None
    (length,) = _FRAME.unpack_from(data, 1)
    if len(data) < 3 + length:
        return None
    return data[3 : 3 + length].decode(errors="replace")


async def read_status(reader: asyncio.StreamReader) -> str | None:
    """None when the responder goes on, else its reason."""
    try:
        first = await reader.readexactly(1)
        if first == b"\x00":
            return None
        (length,) = _FRAME.unpack(await reader.readexactly(2))
        return (await reader.readexactly(length)).decode(errors="replace")
    except asyncio.IncompleteReadError:
        raise HandshakeError("refused", "the responder closed the connection without an answer") from None


# --- messages inside TLS ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accept:
    spi: int
    esn: bool = True  # the responder can key with ESN (a bridge that predates the field always did)


@dataclass(frozen=True, slots=True)
class Ready:
    spi: int
    esn: bool = True  # the tunnel keys with ESN: the sender and the receiver of an SA must agree on it
    peer_spi: int | None = None  # revision 2: the announced SPI the initiator keyed with
    peer_esn: bool | None = None  # revision 2: the announced ESN ability it read (None: a bridge before the echo)


@dataclass(frozen=True, slots=True)
class Done:
    pass


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str
    full: bool = False  # the sender refuses the resumed session only: a full handshake may succeed


Message = Accept | Ready | Done | Reject


def encode_message(msg: Message) -> bytes:
    body: dict[str, Any]
    match msg:
        case Accept():
            body = {"t": "accept", "spi": msg.spi, "esn": msg.esn}
        case Ready():
            body = {"t": "ready", "spi": msg.spi, "esn": msg.esn}
            if msg.peer_spi is not None:
                body["peer_spi"] = msg.peer_spi
            if msg.peer_esn is not None:
                body["peer_esn"] = msg.peer_esn
        case Done():
            body = {"t": "done"}
        case Reject():
            body = {"t": "reject", "reason": msg.reason[:1000]}
            if msg.full:
                body["full"] = True
    raw = json.dumps(body, separators=(",", ":")).encode()
    return _FRAME.pack(len(raw)) + raw


def _spi(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 0xFFFF_FFFF:
        raise ValueError(f"bad SPI {value!r}")
    return value


def _esn(body: dict[str, Any]) -> bool:
    value = body.get("esn", True)
    if not isinstance(value, bool):
        raise ValueError(f"bad esn {value!r}")
    return value


def decode_message(raw: bytes) -> Message:
    """HandshakeError('protocol') for anything that is not one of our messages."""
    try:
        body = json.loads(raw)
        kind = body["t"]
        if kind == "accept":
            return Accept(_spi(body["spi"]), _esn(body))
        if kind == "ready":
            peer_spi = _spi(body["peer_spi"]) if "peer_spi" in body else None
            peer_esn = body.get("peer_esn")
            if peer_esn is not None and not isinstance(peer_esn, bool):
                raise ValueError(f"bad peer_esn {peer_esn!r}")
            return Ready(_spi(body["spi"]), _esn(body), peer_spi, peer_esn)
        if kind == "done":
            return Done()
        if kind == "reject":
            full = body.get("full", False)
            if not isinstance(full, bool):
                raise ValueError(f"bad full {full!r}")
            return Reject(str(body["reason"]), full)
        raise ValueError(f"unknown message {kind!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise HandshakeError("protocol", f"malformed message from the peer: {err}") from None


# --- TLS -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credential:
    """One SVID with its key and the trust bundle it is verified against."""

    identity: Identity
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    roots_pem: bytes
    not_after: dt.datetime


# TLS 1.3 handshake message types and extensions (RFC 8446 §4, §4.2) the trace reads
_MSG_SERVER_HELLO = 2
_MSG_NEW_SESSION_TICKET = 4
_MSG_CERTIFICATE_VERIFY = 15
_EXT_PRE_SHARED_KEY = 41
_EXT_KEY_SHARE = 51
_CONTENT_HANDSHAKE = 22
DEFAULT_TICKET_LIFETIME = 3600  # seconds; RFC 8446 caps a ticket's lifetime at 7 days


def hello_extensions(msg: bytes) -> frozenset[int]:
    """The extension types of a ServerHello handshake message (header included); ValueError if malformed."""
    if len(msg) < 4 or msg[0] != _MSG_SERVER_HELLO:
        raise ValueError("not a ServerHello")
    body = memoryview(msg)[4:]
    pos = 2 + 32  # legacy_version, random
    if len(body) < pos + 1:
        raise ValueError("truncated ServerHello")
    pos += 1 + body[pos] + 2 + 1  # legacy_session_id_echo, cipher_suite, legacy_compression_method
    if len(body) < pos + 2:
        raise ValueError("truncated ServerHello")
    end = pos + 2 + int.from_bytes(body[pos : pos + 2])
    if end > len(body):
        raise ValueError("ServerHello extensions overrun the message")
    pos += 2
    found: set[int] = set()
    while pos < end:
        if pos + 4 > end:
            raise ValueError("truncated ServerHello extension")
        found.add(int.from_bytes(body[pos : pos + 2]))
        pos += 4 + int.from_bytes(body[pos + 2 : pos + 4])
    if pos != end:
        raise ValueError("ServerHello extension overruns the list")
    return frozenset(found)


def key_exchange(server_hello_extensions: frozenset[int]) -> str:
    """The key exchange: "full" (certificates), "psk_dhe_ke" (resumed, with a fresh ECDHE) or "psk_ke"
    (resumed without one)."""
    if _EXT_PRE_SHARED_KEY not in server_hello_extensions:
        return "full"
    return "psk_dhe_ke" if _EXT_KEY_SHARE in server_hello_extensions else "psk_ke"


class HandshakeTrace:
    """What one connection's handshake did, from OpenSSL's message callback (run inside
    do_handshake): the private-key signatures this side made (its CertificateVerify messages: in TLS 1.3 the only
    use of the key) and the ServerHello's extensions (resumed or not, and with which key exchange)."""

    def __init__(self) -> None:
        self.signatures = 0
        self.server_hello: frozenset[int] | None = None
        self.tickets_received = 0
        self.malformed = ""

    def record(self, sent: bool, msg: bytes) -> None:
        kind = msg[0] if msg else -1
        if kind == _MSG_CERTIFICATE_VERIFY and sent:
            self.signatures += 1
        elif kind == _MSG_SERVER_HELLO:  # after a HelloRetryRequest, the second one decides
            try:
                self.server_hello = hello_extensions(msg)
            except ValueError as err:
                self.malformed = str(err)
        elif kind == _MSG_NEW_SESSION_TICKET and not sent:
            self.tickets_received += 1

    @property
    def mode(self) -> str:
        return key_exchange(self.server_hello or frozenset())


def _on_message(write_p: int, _version: int, content_type: int, buf: Any, length: int, ssl: Any, _arg: Any) -> None:
    if content_type != _CONTENT_HANDSHAKE or length < 1:
        return
    conn = SSL.Connection._reverse_mapping.get(ssl)  # pyOpenSSL's own SSL* -> Connection map
    trace = conn.get_app_data() if conn is not None else None
    if isinstance(trace, HandshakeTrace):
        trace.record(bool(write_p), bytes(_ffi.buffer(buf, length)))


_MSG_CALLBACK = _ffi.callback("void(int, int, int, void *, size_t, SSL *, void *)", _on_message)


class BridgeContext(SSL.Context):
    """An SSL.Context that traces every handshake's messages (signatures, resumption). `created`: wall-clock
    seconds, for rotating the server-side ticket keys (OpenSSL makes them per SSL_CTX)."""

    created: float = 0.0


def tls_context(
    cred: Credential, *, ticket_lifetime: int = DEFAULT_TICKET_LIFETIME, created: float = 0.0
) -> SSL.Context:
    """TLS 1.3 only, mutual: present `cred`, require and verify the peer's chain against `cred`'s roots.
    Session tickets on (stateless, keys random per context): the server rejects a ticket older than
    `ticket_lifetime`; clients keep their sessions themselves (no OpenSSL session cache).

    CPU work (key parsing): build contexts off the event loop and reuse them.
    """
    if not 0 < ticket_lifetime <= 7 * 24 * 3600:
        raise ValueError(f"ticket lifetime {ticket_lifetime}s: must be positive and at most 7 days (RFC 8446)")
    certs = x509.load_pem_x509_certificates(cred.chain_pem)
    roots = x509.load_pem_x509_certificates(cred.roots_pem)
    ctx = BridgeContext(SSL.TLS_METHOD)
    ctx.created = created
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate(certs[0])
    for extra in certs[1:]:
        ctx.add_extra_chain_cert(extra)
    key = load_pem_private_key(cred.key_pem, password=None)
    ctx.use_privatekey(key)  # type: ignore[arg-type]
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    assert store is not None
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    # OpenSSL's own chain verification decides, with no Python callback per certificate (the one here only passed
    # OpenSSL's verdict on, for ~3 % of a handshake's CPU); the SPIFFE ID is checked after the handshake
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    # a server that verifies clients resumes only within a session id context: this certificate's
    ctx.set_session_id(hashlib.sha256(cred.chain_pem).digest()[:32])
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_timeout(int(ticket_lifetime))
    _lib.SSL_CTX_set_msg_callback(ctx._context, _MSG_CALLBACK)  # pyOpenSSL has no wrapper
    return ctx


def _ssl_reason(err: SSL.Error) -> str:
    parts = []
    for item in err.args[0] if err.args and isinstance(err.args[0], list) else []:
        if isinstance(item, tuple) and len(item) >= 3:
            parts.append(str(item[2]))
    return ", ".join(parts) or str(err) or type(err).__name__


class TlsChannel:
    """pyOpenSSL over asyncio streams through memory BIOs. `prefix`: cleartext that leaves in front of this side's
    first TLS bytes, in the same write (the initiator's preamble, the responder's announce): one segment, one
    wake-up of the peer. A client reads a refusal or an announce in front of the server's first bytes
    (`announced`)."""

    def __init__(
        self,
        ctx: SSL.Context,
        *,
        server: bool,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: SSL.Session | None = None,
        prefix: bytes = b"",
    ) -> None:
        self._conn = SSL.Connection(ctx, None)
        self.trace = HandshakeTrace()
        self._conn.set_app_data(self.trace)
        if server:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
            if session is not None:
                self._conn.set_session(session)  # offered; OpenSSL falls back to a full handshake by itself
        self._reader = reader
        self._writer = writer
        self._plain = bytearray()
        self._prefix = prefix
        # the client's first bytes may be the responder's refusal instead of TLS (which starts 0x15/0x16), or its
        # announce in front of TLS
        self._first_read = not server
        self.announced: tuple[int, bool] | None = None  # the responder's (spi, esn), when it announced them
        self._shut = False  # close_notify is on its way

    @property
    def connection(self) -> SSL.Connection:
        return self._conn

    async def _flush(self) -> None:
        out = bytearray()
        while True:
            try:
                chunk = self._conn.bio_read(_READ_SIZE)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            out += chunk
        if out:
            if self._prefix:  # only with TLS bytes: a server's first flush, before the ClientHello, has none
                out[:0], self._prefix = self._prefix, b""
            self._writer.write(bytes(out))
            await self._writer.drain()

    async def _fill(self) -> None:
        data = await self._reader.read(_READ_SIZE)
        if not data:
            raise HandshakeError("tls", "the peer closed the connection")
        if self._first_read:
            self._first_read = False
            if data[0] == 1:
                reason = parse_refusal(data)
                while reason is None:
                    more = await self._reader.read(_READ_SIZE)
                    if not more:
                        raise HandshakeError("refused", "the responder closed the connection without a reason")
                    data += more
                    reason = parse_refusal(data)
                raise HandshakeError("refused", f"the responder refused: {reason}")
            if data[0] == _ANNOUNCE_TYPE:
                data = await self._read_announce(data)
                if not data:
                    return  # its TLS flight comes in the next read
        self._conn.bio_write(data)

    async def _read_announce(self, data: bytes) -> bytes:
        """The responder's announce at the start of `data`; returns what follows it."""
        while len(data) < _ANNOUNCE.size:
            more = await self._reader.read(_READ_SIZE)
            if not more:
                raise HandshakeError("protocol", "the responder closed the connection inside its announce")
            data += more
        _, spi, flags = _ANNOUNCE.unpack_from(data)
        try:
            self.announced = (_spi(spi), bool(flags & _ANNOUNCE_ESN))
        except ValueError:
            raise HandshakeError("protocol", "the responder announced SPI 0, which no SA can have") from None
        return data[_ANNOUNCE.size :]

    async def handshake(self, *, flush: bool = True) -> None:
        """`flush=False` keeps the last flight (the client's Finished) for the next send to carry."""
        while True:
            try:
                self._conn.do_handshake()
                break
            except SSL.WantReadError:
                await self._flush()
                await self._fill()
            except SSL.Error as err:
                with contextlib.suppress(Exception):
                    await self._flush()  # the alert tells the peer why
                raise HandshakeError("tls", f"TLS handshake failed: {_ssl_reason(err)}") from None
        if self.trace.malformed:
            raise HandshakeError("tls", f"unreadable ServerHello: {self.trace.malformed}")
        if self.trace.mode == "psk_ke":
            # resumption without a fresh ECDHE would reuse the old secret's keys: no forward secrecy
            raise HandshakeError("tls", "the session was resumed with psk_ke (no ECDHE); only psk_dhe_ke is allowed")
        if flush:
            await self._flush()

    @property
    def resumed(self) -> bool:
        return self.trace.mode != "full"

    def session(self) -> SSL.Session | None:
        """This connection's session: after the server's NewSessionTicket arrived, one that can be resumed."""
        return self._conn.get_session() if self.trace.tickets_received else None

    async def flush(self) -> None:
        await self._flush()

    async def send(self, msg: Message) -> None:
        self._queue(msg)
        await self._flush()

    async def send_last(self, msg: Message) -> None:
        """`msg` and close_notify in one write: one wake-up of the peer, not two."""
        self._queue(msg)
        self._shut = True
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()
        await self._flush()

    def _queue(self, msg: Message) -> None:
        data = encode_message(msg)
        while data:
            sent = self._conn.send(data)
            data = data[sent:]

    async def recv(self) -> Message:
        while True:
            if len(self._plain) >= _FRAME.size:
                (length,) = _FRAME.unpack_from(self._plain)
                if length > MAX_FRAME:
                    raise HandshakeError("protocol", f"message of {length} bytes is too long")
                if len(self._plain) >= _FRAME.size + length:
                    raw = bytes(self._plain[_FRAME.size : _FRAME.size + length])
                    del self._plain[: _FRAME.size + length]
                    return decode_message(raw)
            try:
                self._plain += self._conn.recv(_READ_SIZE)
            except SSL.WantReadError:
                await self._flush()  # TLS 1.3 may have post-handshake records to send
                await self._fill()
            except SSL.ZeroReturnError:
                raise HandshakeError("protocol", "the peer closed the channel mid-exchange") from None
            except SSL.Error as err:
                raise HandshakeError("tls", f"TLS error: {_ssl_reason(err)}") from None

    def poll(self) -> Message | None:
        """A message the peer already sent (decrypting what is buffered), without waiting for more."""
        with contextlib.suppress(SSL.WantReadError, SSL.ZeroReturnError):
            self._plain += self._conn.recv(_READ_SIZE)
        if len(self._plain) < _FRAME.size:
            return None
        (length,) = _FRAME.unpack_from(self._plain)
        if length > MAX_FRAME or len(self._plain) < _FRAME.size + length:
            return None
        raw = bytes(self._plain[_FRAME.size : _FRAME.size + length])
        del self._plain[: _FRAME.size + length]
        return decode_message(raw)

    def peer_fingerprint(self) -> bytes:
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        if cert is None:
            raise HandshakeError("identity", "the peer presented no certificate")
        return cert.fingerprint(hashes.SHA256())

    def peer(self) -> tuple[Identity, dt.datetime]:
        """The peer's SPIFFE identity (exactly one URI SAN) and the leaf's expiry. After a resumption: those of
        the certificate the peer presented in the full handshake the session comes from (kept in the session)."""
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        if cert is None:
            raise HandshakeError("identity", "the peer presented no certificate")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) != 1:
            raise HandshakeError("identity", f"the peer certificate has {len(uris)} URI SANs; an SVID has exactly one")
        try:
            return Identity.parse(uris[0]), cert.not_valid_after_utc
        except IdentityError as err:
            raise HandshakeError("identity", f"the peer certificate names no mesh identity: {err}") from None

    def export(self, binding: Binding) -> bytes:
        return self._conn.export_keying_material(
            EXPORTER_LABEL, exporter_length(binding.key_bytes), exporter_context(binding)
        )

    async def close(self) -> None:
        if self._shut:
            return
        self._shut = True
        with contextlib.suppress(Exception):
            # close_notify also keeps the session resumable: OpenSSL marks a session freed without it unusable
            self._conn.shutdown()
            await self._flush()


# --- the exchange --------------------------------------------------------------------------------------------------


class Installer(Protocol):
    """What one side programs while the exchange runs (ipsec_bridge.sa_manager provides the real one)."""

    async def allocate_spi(self) -> int:
        """Revision 1: an inbound SPI the kernel reserves now (ALLOCSPI); `install` puts the SA over it."""

    def propose_spi(self) -> int:
        """Revision 2: an inbound SPI chosen here, reserved by nothing until `install` puts its SA in (which the
        kernel refuses if the SPI is live)."""

    async def install(
        self, inbound: tuple[int, Aead] | None, outbound: tuple[int, Aead] | None, *, esn: bool = True
    ) -> None:
        """Inbound SA first, then outbound SA and (unless the caller switches them later) the pair's policies.
        `esn`: 64-bit sequence numbers, as negotiated for the tunnel."""

    async def rollback(self) -> None: ...


AdmissionCheck = Callable[[], str | None]  # None: still admitted; else why not (state can change mid-handshake)


class ChainBounds(Protocol):
    """The responder's side of the resumption bounds for one peer bridge and identity pair
    (`ipsec_bridge.tickets.ResumptionChains.bounds`)."""

    def resumed(self) -> str | None:
        """Why a resumed session must not be accepted (None: it is, and counts against the chain)."""

    def full(self) -> None:
        """A verified full handshake: a new chain starts."""


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Ticket:
    """A resumable session the initiator holds for one peer bridge and identity pair (memory only), with the
    certificate it was made with. `chain_started`/`resumptions`: when the full handshake at the root of this
    chain of resumptions ran (monotonic) and how many resumptions followed it.

    The session is held as OpenSSL's DER of it (`session_der`, ~1 KiB: the ticket, the resumption secret, the
    peer's certificate) and parsed again when offered: a live SSL_SESSION with its parsed certificate costs
    ~10 KiB, and a node keeps one per pair it talked to (measured: 1,000 sessions, +10 MiB RSS)."""

    der: bytes = field(repr=False)
    context: SSL.Context = field(repr=False)  # the client context the session belongs to (renewal replaces it)
    peer: Identity
    peer_fingerprint: bytes = field(repr=False)
    peer_not_after: dt.datetime
    chain_started: float
    resumptions: int
    issued: float

    @property
    def session(self) -> SSL.Session:
        """The session to offer (a new SSL_SESSION each time: OpenSSL takes a reference to it)."""
        return session_from_der(self.der, self.context)


def session_der(session: SSL.Session) -> bytes:
    size = _lib.i2d_SSL_SESSION(session._session, _ffi.NULL)
    if size <= 0:
        raise HandshakeError("tls", "the TLS session could not be encoded")
    buf = _ffi.new("unsigned char[]", size)
    _lib.i2d_SSL_SESSION(session._session, _ffi.new("unsigned char **", buf))
    return bytes(_ffi.buffer(buf, size))


def session_from_der(der: bytes, context: SSL.Context) -> SSL.Session:
    """pyOpenSSL has no wrapper: built as its Connection.get_session builds one (pinned to `context`, which
    Connection.set_session requires)."""
    raw = _ffi.new("unsigned char[]", der)
    parsed = _lib.d2i_SSL_SESSION(_ffi.NULL, _ffi.new("unsigned char **", raw), len(der))
    if parsed == _ffi.NULL:
        raise HandshakeError("tls", "a held TLS session could not be decoded")
    session = SSL.Session.__new__(SSL.Session)
    session._session = _ffi.gc(parsed, _lib.SSL_SESSION_free)
    session._context = context
    return session


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one side needs for one handshake."""

    credential: Credential
    context: SSL.Context
    expected_peer: Identity
    initiator_address: IPAddress  # what the keys are bound to: pod addresses (pod scope) or node addresses
    responder_address: IPAddress
    installer: Installer
    recheck: AdmissionCheck
    esn: bool = True  # this side can key with ESN (false: its offload device cannot offload ESN SAs)
    monotonic: Callable[[], float] = time.monotonic  # the caller's clock: Result.seconds is measured on it
    ticket: Ticket | None = None  # initiator: a session to offer for resumption (None: a full handshake)
    wall: Callable[[], dt.datetime] = _utc_now  # a resumed session's certificate must not have expired since
    chains: ChainBounds | None = None  # responder: N resumptions / age since the last full handshake (None: unbounded)


@dataclass(frozen=True, slots=True)
class Result:
    initiator: bool
    peer_identity: Identity
    peer_not_after: dt.datetime
    local_not_after: dt.datetime
    spi_in: int
    spi_out: int
    key_bytes: int
    seconds: float
    esn: bool = True
    resumed: bool = False  # the TLS session was resumed (psk_dhe_ke): no certificate was sent or signed for
    signatures: int = 0  # private-key signatures this side made (its CertificateVerify messages)
    ticket: Ticket | None = field(default=None, repr=False, compare=False)  # initiator: the session to keep


def _check_peer(channel: TlsChannel, plan: Plan, role: str) -> tuple[Identity, dt.datetime]:
    identity, not_after = channel.peer()
    what = "resumed a session made with" if channel.resumed else "presented"
    if identity != plan.expected_peer:
        raise HandshakeError(
            "identity", f"the {role} {what} {identity.uri}, but WDS says that address is {plan.expected_peer.uri}"
        )
    if channel.resumed:
        # a full handshake would have refused an expired certificate; a session outlives none
        if not_after <= plan.wall():
            raise HandshakeError("resumption", f"the {role}'s certificate in the session expired at {not_after}")
        if plan.ticket is not None and channel.peer_fingerprint() != plan.ticket.peer_fingerprint:
            raise HandshakeError("resumption", f"the {role} resumed a session other than the one offered")
    return plan.expected_peer, not_after  # equal to the one parsed; the view's object is shared by every tunnel


async def _reject(channel: TlsChannel, err: HandshakeError, *, full: bool = False) -> None:
    with contextlib.suppress(Exception):
        await channel.send(Reject(f"{err.code}: {err}", full))


def _keys(channel: TlsChannel, plan: Plan, spi_i: int, spi_r: int, key_bytes: int, scope: KeyScope) -> DirectionalKeys:
    try:
        binding = Binding(scope, plan.initiator_address, plan.responder_address, spi_i, spi_r, key_bytes)
        return split_keys(channel.export(binding), key_bytes)
    except KeyDerivationError as err:
        raise HandshakeError("keys", str(err)) from None


async def initiate(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, preamble: Preamble, plan: Plan
) -> Result:
    """The initiator's side, on a connected stream. Raises HandshakeError; leaves nothing half-installed."""
    started = plan.monotonic()
    offered = plan.ticket.session if plan.ticket is not None else None
    channel = TlsChannel(plan.context, server=False, reader=reader, writer=writer, session=offered,
                         prefix=preamble.encode())  # fmt: skip
    await channel.handshake(flush=False)
    allocated = False
    try:
        peer, peer_not_after = await _verify_peer(channel, plan, "responder")
        echo: tuple[int, bool] | tuple[None, None] = (None, None)  # revision 2: the announce, sent back inside TLS
        if channel.announced is not None:
            spi_r, esn_r = echo = channel.announced
            allocated = True
            spi_i = plan.installer.propose_spi()
        else:  # revision 1
            await channel.flush()  # our Finished: the responder verifies us now
            answer = await channel.recv()
            if not isinstance(answer, Accept):
                raise _not_answered(answer, channel, "accept")
            spi_r, esn_r = answer.spi, answer.esn
            allocated = True
            spi_i = await plan.installer.allocate_spi()
        esn = plan.esn and esn_r
        keys = _keys(channel, plan, spi_i, spi_r, preamble.key_bytes, preamble.scope)
        await plan.installer.install((spi_i, keys.responder_to_initiator), None, esn=esn)
        await channel.send(Ready(spi_i, esn, *echo))  # revision 2: with our Finished, the responder verifies us now
        final = await channel.recv()
        if not isinstance(final, Done):
            raise _not_answered(final, channel, "done")
        await plan.installer.install(None, (spi_r, keys.initiator_to_responder), esn=esn)
        ticket = _next_ticket(channel, plan, peer, peer_not_after, started)
    except BaseException:
        if allocated:
            await plan.installer.rollback()
        raise
    finally:
        await channel.close()
    return Result(
        True, peer, peer_not_after, plan.credential.not_after, spi_i, spi_r, preamble.key_bytes,
        plan.monotonic() - started, esn, channel.resumed, channel.trace.signatures, ticket,
    )  # fmt: skip


def _not_answered(msg: Message, channel: TlsChannel, expected: str) -> HandshakeError:
    """What the initiator raises when the responder sent `msg` instead of `expected`."""
    if isinstance(msg, Reject):
        # a refused resumption: the current certificates may pass in a full handshake
        code = "resumption" if msg.full and channel.resumed else "refused"
        return HandshakeError(code, f"the responder refused: {msg.reason}")
    return HandshakeError("protocol", f"expected {expected}, got {type(msg).__name__.lower()}")


def _next_ticket(
    channel: TlsChannel, plan: Plan, peer: Identity, peer_not_after: dt.datetime, started: float
) -> Ticket | None:
    """The session the server's NewSessionTicket made resumable, carrying on the chain of the one resumed."""
    session = channel.session()
    if session is None:
        return None
    prior = plan.ticket if channel.resumed else None
    return Ticket(
        session_der(session), plan.context, peer, channel.peer_fingerprint(), peer_not_after,
        chain_started=prior.chain_started if prior is not None else started,
        resumptions=prior.resumptions + 1 if prior is not None else 0,
        issued=plan.monotonic(),
    )  # fmt: skip


async def _verify_peer(channel: TlsChannel, plan: Plan, role: str) -> tuple[Identity, dt.datetime]:
    """The peer's SVID must be the identity WDS holds for its pod IP, and policy must still admit the pair;
    otherwise tell the peer (in-channel) and raise. No key exists yet at this point. A resumed session is
    checked the same way, on the certificate it was made with; when that is what fails, the peer learns that
    a full handshake (its current certificate) may succeed."""
    try:
        checked = _check_peer(channel, plan, role)
        why_not = plan.recheck()
        if why_not is not None:
            raise HandshakeError("denied", why_not)
        if plan.chains is not None:  # last: only a session every other check passed counts against its chain
            if channel.resumed:
                bound = plan.chains.resumed()
                if bound is not None:
                    raise HandshakeError("resumption", bound)
            else:
                plan.chains.full()
    except HandshakeError as err:
        if channel.resumed and err.code in ("identity", "resumption"):
            stale = HandshakeError("resumption", f"resumed session refused: {err}")
            await _reject(channel, stale, full=True)
            raise stale from None
        await _reject(channel, err)
        raise
    return checked


async def refuse(writer: asyncio.StreamWriter, reason: str) -> None:
    """Answer a preamble with a refusal (before any TLS)."""
    with contextlib.suppress(OSError):
        writer.write(status_refused(reason))
        await writer.drain()


async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, preamble: Preamble, plan: Plan) -> Result:
    """The responder's side, once the preamble is read and accepted. Raises HandshakeError."""
    started = plan.monotonic()
    announcing = preamble.revision >= 2
    spi_r = plan.installer.propose_spi() if announcing else 0
    channel = TlsChannel(plan.context, server=True, reader=reader, writer=writer,
                         prefix=announce(spi_r, plan.esn) if announcing else b"")  # fmt: skip
    await channel.handshake()
    allocated = False
    try:
        peer, peer_not_after = await _verify_peer(channel, plan, "initiator")
        early = channel.poll()  # what the initiator sent with its Finished: a refusal of us, or (revision 2) ready
        if isinstance(early, Reject):
            raise HandshakeError("resumption" if early.full else "refused", f"the initiator refused: {early.reason}")
        if announcing:
            ready = early if early is not None else await channel.recv()
        else:
            if early is not None:
                raise HandshakeError("protocol", f"unexpected {type(early).__name__.lower()} before accept")
            allocated = True
            spi_r = await plan.installer.allocate_spi()
            await channel.send(Accept(spi_r, plan.esn))
            ready = await channel.recv()
        if not isinstance(ready, Ready):
            reason = ready.reason if isinstance(ready, Reject) else type(ready).__name__.lower()
            raise HandshakeError("refused", f"the initiator refused: {reason}")
        if announcing and (why := _echo_mismatch(ready, spi_r, plan.esn)) is not None:
            err = HandshakeError("protocol", f"{why} (altered on the way?)")
            await _reject(channel, err)
            raise err
        if ready.esn and not plan.esn:
            err = HandshakeError("protocol", "the initiator keys with ESN, which this side's offload device cannot do")
            await _reject(channel, err)
            raise err
        allocated = True
        keys = _keys(channel, plan, ready.spi, spi_r, preamble.key_bytes, preamble.scope)
        await plan.installer.install(
            (spi_r, keys.initiator_to_responder), (ready.spi, keys.responder_to_initiator), esn=ready.esn
        )
        await channel.send_last(Done())
    except BaseException:
        if allocated:
            await plan.installer.rollback()
        raise
    finally:
        await channel.close()
    return Result(
        False, peer, peer_not_after, plan.credential.not_after, spi_r, ready.spi, preamble.key_bytes,
        plan.monotonic() - started, ready.esn, channel.resumed, channel.trace.signatures,
    )  # fmt: skip


def _echo_mismatch(ready: Ready, spi: int, esn: bool) -> str | None:
    """Why the initiator's echo of the announce (inside TLS) differs from what this side announced in clear."""
    if ready.peer_spi != spi:
        seen = "none" if ready.peer_spi is None else f"0x{ready.peer_spi:08x}"
        return f"the initiator keyed with SPI {seen}, not the 0x{spi:08x} announced"
    if ready.peer_esn is not None and ready.peer_esn != esn:
        said = {True: "on", False: "off"}
        return f"the initiator read ESN {said[ready.peer_esn]} in the announce, which said {said[esn]}"
    return None


async def request_rekey(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, preamble: Preamble) -> None:
    """Ask the pair's initiator to rekey now (this side is the responder)."""
    writer.write(preamble.encode())
    await writer.drain()
    refusal = await read_status(reader)
    if refusal is not None:
        raise HandshakeError("refused", f"rekey request refused: {refusal}")


# --- idle teardown -------------------------------------------------------------------------------------------------


class Teardown(enum.IntEnum):
    """The answer to a teardown request (status 1 is the generic refusal of a preamble: see the module docstring)."""

    STOPPED = 0  # the peer removed its out policies and keeps its inbound SA until this side says done
    KEEP = 2  # the peer keeps the pair: nothing is removed on either side
    ABSENT = 3  # the peer has no such generation: nothing of it sends to this side


@dataclass(frozen=True, slots=True)
class TeardownReply:
    status: Teardown | None  # None: the peer does not know teardown requests (it refused the preamble or closed)
    reason: str = ""


def teardown_answer(status: Teardown, reason: str = "") -> bytes:
    raw = reason.encode()[:MAX_FRAME]
    return bytes([status]) + _FRAME.pack(len(raw)) + raw


async def request_teardown(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, preamble: Preamble
) -> TeardownReply:
    """Ask the peer to remove an idle pair (this side is either end). After STOPPED, remove this side's pair and
    then call `teardown_done` on the same connection."""
    writer.write(preamble.encode())
    await writer.drain()
    try:
        status = (await reader.readexactly(1))[0]
        (length,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
        reason = (await reader.readexactly(length)).decode(errors="replace")
    except asyncio.IncompleteReadError:
        return TeardownReply(None, "the peer closed the connection without an answer")
    if status not in {t.value for t in Teardown}:
        return TeardownReply(None, f"the peer refused the request: {reason}")
    return TeardownReply(Teardown(status), reason)


async def answer_teardown(writer: asyncio.StreamWriter, status: Teardown, reason: str = "") -> None:
    """The asked side's answer to a teardown request (`teardown_answer`)."""
    writer.write(teardown_answer(status, reason))
    await writer.drain()


async def teardown_done(writer: asyncio.StreamWriter) -> None:
    """This side's pair is gone (policies, then SAs): the peer may remove its inbound SA now."""
    writer.write(b"\x00")
    await writer.drain()


async def wait_teardown_done(reader: asyncio.StreamReader) -> bool:
    """The asker's done (True), or its connection closed without it (False: it crashed or gave up)."""
    try:
        return await reader.readexactly(1) == b"\x00"
    except asyncio.IncompleteReadError:
        return False
