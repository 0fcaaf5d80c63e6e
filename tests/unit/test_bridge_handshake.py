"""The bridge handshake with real TLS 1.3 over real TCP, certificates from a real in-process ztd (impersonation
by node-bound bridge tokens), and a recording installer in place of XFRM (the host kernel has no ESP; the
kernel test programs the real thing). What is checked: both ends derive the same two directional keys,
bound to the SPIs; identity and admission are verified on both sides before any SPI exists; a spoofed
address, an impostor responder and a foreign CA get no tunnel; the wire format refuses garbage clearly;
resumption within its bounds, enforced by the responder too, and ended by ticket-key rotation and renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from ipsec_bridge import certs as certs_module
from ipsec_bridge import handshake as hs
from ipsec_bridge.certs import Certificates
from ipsec_bridge.keys import KeyScope
from ipsec_bridge.tickets import ResumptionChains, ResumptionPolicy, TicketKey, TicketStore
from ipsec_bridge.xfrm.messages import Aead
from tests.helpers import running_ztd
from tests.support.bridge_mesh import NODE_A_IP, NODE_B_IP, PODS, identity, write_mesh
from tests.support.wait import eventually
from ztcore.identity import Identity
from ztcore.identity.caclient import CAClient, CAClientOptions
from ztcore.identity.manager import RotationPolicy, SecretManager

BRIDGE = Identity("cluster.local", "istio-system", "ztunnel")


@dataclass
class RecordingInstaller:
    """Stands in for XFRM: hands out SPIs and records every call, keys included (compared, never printed)."""

    spis: Any = field(default_factory=lambda: itertools.count(0x1000))
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def allocate_spi(self) -> int:
        spi = int(next(self.spis))
        self.calls.append(("alloc", spi))
        return spi

    def propose_spi(self) -> int:  # no kernel state: an SPI chosen, reserved only by its inbound SA's install
        spi = int(next(self.spis))
        self.calls.append(("propose", spi))
        return spi

    esn: list[bool] = field(default_factory=list)  # the esn of every install call

    async def install(
        self, inbound: tuple[int, Aead] | None, outbound: tuple[int, Aead] | None, *, esn: bool = True
    ) -> None:
        self.esn.append(esn)
        for kind, what in (("inbound", inbound), ("outbound", outbound)):
            if what is not None:
                self.calls.append((kind, what[0], what[1].key + what[1].salt))

    async def rollback(self) -> None:
        self.calls.append(("rollback",))

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]

    def installed(self) -> list[tuple[Any, ...]]:
        """What reached the kernel: everything but a proposed SPI (chosen here, reserved by nothing)."""
        return [c for c in self.calls if c[0] != "propose"]

    def key(self, kind: str) -> bytes:
        found: bytes = next(c[2] for c in self.calls if c[0] == kind)
        return found


@dataclass
class Mesh:
    """Each pod's SVID (with its TLS context), issued to its node's bridge by impersonation; each node's secrets."""

    creds: dict[str, tuple[hs.Credential, Any]]
    secrets: dict[str, SecretManager]
    certs: dict[str, Certificates]  # each node's, which saw the first issue (renewals reach its callbacks)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_ztd(tmp_path, config_dir=write_mesh(tmp_path / "mesh")) as rz:
        managers = []
        for node in ("node-a", "node-b"):
            token = tmp_path / f"{node}.token"
            token.write_text(rz.token("istio-system/ztunnel", node=node))
            ca = CAClient(
                CAClientOptions(
                    address=f"127.0.0.1:{rz.cfg.secure_port}", root_cert=rz.cfg.published_root, token_file=token
                )
            )
            managers.append((ca, SecretManager(ca, RotationPolicy(), credential_identity=BRIDGE)))
        tasks = [asyncio.create_task(sm.run()) for _, sm in managers]
        try:
            certs = {"node-a": Certificates(managers[0][1]), "node-b": Certificates(managers[1][1])}
            creds = {pod: await certs[PODS[pod][3]].credential(Identity.parse(identity(pod)), 10) for pod in PODS}
            secrets = {node: sm for node, (_, sm) in zip(("node-a", "node-b"), managers, strict=True)}
            yield Mesh(creds, secrets, certs)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for ca, _ in managers:
                await ca.close()


def plan(cred: Any, expected: str, installer: RecordingInstaller, src: str, dst: str, **kw: Any) -> hs.Plan:
    credential, context = cred
    return hs.Plan(
        credential=credential,
        context=context,
        expected_peer=Identity.parse(expected),
        initiator_address=ip_address(src),
        responder_address=ip_address(dst),
        installer=installer,
        recheck=kw.pop("recheck", lambda: None),
        **kw,
    )


@dataclass
class Outcome:
    initiator: hs.Result | hs.HandshakeError
    responder: hs.Result | hs.HandshakeError


async def run_pair(
    preamble: hs.Preamble,
    initiator_plan: hs.Plan,
    responder_plan: Callable[[hs.Preamble], hs.Plan],
    *,
    responder_revision: int = hs.REVISION,
) -> Outcome:
    """One handshake over loopback TCP: the responder reads the preamble, resolves a plan, responds.
    `responder_revision=1`: it answers as a bridge from before the announce (which ignores the preamble's "rev")."""
    done: asyncio.Future[hs.Result | hs.HandshakeError] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            got = await hs.read_preamble(reader)
            spoken = dataclasses.replace(got, revision=min(got.revision, responder_revision))
            done.set_result(await hs.respond(reader, writer, spoken, responder_plan(got)))
        except hs.HandshakeError as err:
            done.set_result(err)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            first: hs.Result | hs.HandshakeError = await hs.initiate(reader, writer, preamble, initiator_plan)
        except hs.HandshakeError as err:
            first = err
        finally:
            writer.close()
        second = await asyncio.wait_for(done, 10)
    finally:
        server.close()
        await server.wait_closed()
    return Outcome(first, second)


def pod_preamble(src: str, dst: str) -> hs.Preamble:
    return hs.Preamble(hs.Kind.HANDSHAKE, KeyScope.POD, PODS[src][4], PODS[dst][4])


@pytest.mark.parametrize(
    ("initiator_revision", "responder_revision", "reserve"),
    [(2, 2, "propose"), (2, 1, "alloc"), (1, 2, "alloc"), (1, 1, "alloc")],
    ids=["announce", "old-responder", "old-initiator", "revision-1"],
)
async def test_both_ends_derive_the_same_directional_keys_bound_to_their_spis(
    mesh: Mesh, initiator_revision: int, responder_revision: int, reserve: str
) -> None:
    """Whichever side predates the announce, the two speak the revision both know (a rolling upgrade)."""
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller(spis=itertools.count(0x9000))
    i_plan = plan(mesh.creds["a1"], identity("b1"), ins_i, a1, b1)
    r_plan = plan(mesh.creds["b1"], identity("a1"), ins_r, a1, b1)
    preamble = dataclasses.replace(pod_preamble("a1", "b1"), revision=initiator_revision)
    out = await run_pair(preamble, i_plan, lambda _: r_plan, responder_revision=responder_revision)
    assert isinstance(out.initiator, hs.Result) and isinstance(out.responder, hs.Result), out
    ri, rr = out.initiator, out.responder
    # each side allocates its inbound SPI only; the peer's inbound SPI is its outbound one
    assert (ri.spi_in, ri.spi_out, rr.spi_in, rr.spi_out) == (0x1000, 0x9000, 0x9000, 0x1000)
    assert ri.peer_identity.uri == identity("b1") and rr.peer_identity.uri == identity("a1")
    # the order that makes the switch lossless: nothing outbound before the peer can decrypt it
    assert ins_r.kinds() == [reserve, "inbound", "outbound"]
    assert ins_i.kinds() == [reserve, "inbound", "outbound"]
    assert ins_i.key("outbound") == ins_r.key("inbound")  # a1 -> b1
    assert ins_r.key("outbound") == ins_i.key("inbound")  # b1 -> a1
    assert ins_i.key("outbound") != ins_i.key("inbound")
    assert len(ins_i.key("outbound")) == 20  # AES-128 key + 4-byte salt

    # a second handshake for the same pair gives fresh keys (new TLS secrets), even with the same SPIs
    again_i, again_r = RecordingInstaller(), RecordingInstaller(spis=itertools.count(0x9000))
    out2 = await run_pair(
        dataclasses.replace(pod_preamble("a1", "b1"), key_bytes=32),
        plan(mesh.creds["a1"], identity("b1"), again_i, a1, b1),
        lambda _: plan(mesh.creds["b1"], identity("a1"), again_r, a1, b1),
    )
    assert isinstance(out2.initiator, hs.Result) and out2.initiator.key_bytes == 32
    assert again_i.key("outbound") == again_r.key("inbound")
    assert len(again_i.key("outbound")) == 36  # AES-256 chosen by the initiator
    assert again_i.key("outbound")[:20] != ins_i.key("outbound")


async def test_a_pod_claiming_another_pods_address_gets_no_tunnel(mesh: Mesh) -> None:
    """a2 (shop/debug) claims a1's address towards b2: b2's side sees debug's SVID where WDS says frontend."""
    a1, b2 = PODS["a1"][4], PODS["b2"][4]
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller()
    out = await run_pair(
        pod_preamble("a1", "b2"),
        plan(mesh.creds["a2"], identity("b2"), ins_i, a1, b2),
        lambda _: plan(mesh.creds["b2"], identity("a1"), ins_r, a1, b2),
    )
    assert isinstance(out.responder, hs.HandshakeError) and out.responder.code == "identity"
    assert str(out.responder) == (
        "the initiator presented spiffe://cluster.local/ns/shop/sa/debug, but WDS says that address is "
        "spiffe://cluster.local/ns/shop/sa/frontend"
    )
    assert isinstance(out.initiator, hs.HandshakeError) and out.initiator.code == "refused"
    assert "identity: the initiator presented" in str(out.initiator)
    # the responder installed nothing; the initiator, which had verified the responder, keyed its inbound SA
    # before the responder had verified it, and removed it on the refusal
    assert ins_i.kinds() == ["propose", "inbound", "rollback"] and ins_r.installed() == []


async def test_an_impostor_responder_is_refused_before_any_spi(mesh: Mesh) -> None:
    """Whoever answers for b1 presents b2's (valid, same-CA) SVID: the initiator refuses."""
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller()
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan(mesh.creds["a1"], identity("b1"), ins_i, a1, b1),
        lambda _: plan(mesh.creds["b2"], identity("a1"), ins_r, a1, b1),
    )
    assert isinstance(out.initiator, hs.HandshakeError) and out.initiator.code == "identity"
    assert "the responder presented spiffe://cluster.local/ns/shop/sa/cart" in str(out.initiator)
    assert isinstance(out.responder, hs.HandshakeError) and out.responder.code == "refused"
    # the refusal travels with the initiator's Finished: the responder never reserves an SPI (it chose one, which
    # no kernel state holds)
    assert ins_i.calls == [] and ins_r.installed() == []  # the responder only chose its SPI


async def test_policy_checked_again_after_tls_stops_the_handshake(mesh: Mesh) -> None:
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller()
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan(mesh.creds["a1"], identity("b1"), ins_i, a1, b1),
        lambda _: plan(
            mesh.creds["b1"], identity("a1"), ins_r, a1, b1, recheck=lambda: "DENY policy payments/x matched"
        ),
    )
    assert isinstance(out.responder, hs.HandshakeError) and out.responder.code == "denied"
    assert isinstance(out.initiator, hs.HandshakeError)
    assert "denied: DENY policy payments/x matched" in str(out.initiator)
    # the responder installed nothing; the initiator, which had verified the responder, keyed its inbound SA
    # before the responder had verified it, and removed it on the refusal
    assert ins_i.kinds() == ["propose", "inbound", "rollback"] and ins_r.installed() == []


def _foreign_credential(uri: str, trusts: bytes) -> hs.Credential:
    """A leaf from a self-made CA with a mesh-looking URI SAN (right name, wrong issuer) that itself trusts
    `trusts` (the mesh roots, so that the verdict we see is the responder's)."""
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "elsewhere")])
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
        .serial_number(1).not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    assert ca.issuer == name
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(name).public_key(key.public_key())
        .serial_number(2).not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    return hs.Credential(
        Identity.parse(uri),
        leaf.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        trusts,
        now + dt.timedelta(hours=1),
    )


async def test_a_certificate_from_another_ca_fails_tls(mesh: Mesh) -> None:
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    foreign = _foreign_credential(identity("a1"), mesh.creds["b1"][0].roots_pem)
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller()
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan((foreign, hs.tls_context(foreign)), identity("b1"), ins_i, a1, b1),
        lambda _: plan(mesh.creds["b1"], identity("a1"), ins_r, a1, b1),
    )
    assert isinstance(out.responder, hs.HandshakeError) and out.responder.code == "tls"
    assert "certificate verify failed" in str(out.responder)
    assert isinstance(out.initiator, hs.HandshakeError) and "unknown ca" in str(out.initiator)
    # the responder installed nothing; the initiator, which had verified the responder, keyed its inbound SA
    # before the responder had verified it, and removed it on the refusal
    assert ins_i.kinds() == ["propose", "inbound", "rollback"] and ins_r.installed() == []


async def test_a_refused_preamble_reaches_the_initiator_as_a_reason(mesh: Mesh) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hs.read_preamble(reader)
        await hs.refuse(writer, "10.2.0.99 is not a mesh pod of node node-b")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    ins = RecordingInstaller()
    with pytest.raises(hs.HandshakeError) as err:
        await hs.initiate(
            reader, writer, hs.Preamble(hs.Kind.HANDSHAKE, KeyScope.POD, "10.1.0.10", "10.2.0.99"),
            plan(mesh.creds["a1"], identity("b1"), ins, "10.1.0.10", "10.2.0.99"),
        )  # fmt: skip
    writer.close()
    server.close()
    assert err.value.code == "refused"
    assert str(err.value) == "the responder refused: 10.2.0.99 is not a mesh pod of node node-b"
    assert ins.calls == []


def record_writes(writer: asyncio.StreamWriter, into: list[bytes]) -> list[bytes]:
    """Each `writer.write` from here on, appended to `into` (returned), and written as before."""
    write = writer.write

    def recording(data: bytes | bytearray | memoryview) -> None:
        into.append(bytes(data))
        write(data)

    writer.write = recording  # type: ignore[method-assign]
    return into


async def test_the_preamble_leaves_with_the_client_hello_and_the_announce_with_the_server_flight(mesh: Mesh) -> None:
    """One segment each way where there were two: the peer wakes once per flight (in UML, where both bridges share
    one CPU, a wake-up is a large part of a first connection)."""
    first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first.set_result(await reader.read(1 << 16))  # what the initiator's first write carried, at least
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    writes = record_writes(writer, [])
    preamble = pod_preamble("a1", "b1")
    with pytest.raises(hs.HandshakeError):
        await hs.initiate(reader, writer, preamble, plan(mesh.creds["a1"], identity("b1"), RecordingInstaller(),
                                                         PODS["a1"][4], PODS["b1"][4]))  # fmt: skip
    writer.close()
    server.close()
    head = len(preamble.encode())
    assert writes[0][:head] == preamble.encode() and writes[0][head] == 0x16  # a TLS handshake record follows
    assert (await first)[: head + 1] == writes[0][: head + 1]

    # the responder: its announce, then the server flight, in one write
    sent: list[bytes] = []  # the responder's writes

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record_writes(writer, sent)
        with contextlib.suppress(hs.HandshakeError):
            got = await hs.read_preamble(reader)
            await hs.respond(reader, writer, got, plan(mesh.creds["b1"], identity("a1"), RecordingInstaller(
                spis=itertools.count(0x9000)), PODS["a1"][4], PODS["b1"][4]))  # fmt: skip
        writer.close()

    server = await asyncio.start_server(respond, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    result = await hs.initiate(reader, writer, preamble, plan(mesh.creds["a1"], identity("b1"), RecordingInstaller(),
                                                              PODS["a1"][4], PODS["b1"][4]))  # fmt: skip
    writer.close()
    server.close()
    assert result.spi_out == 0x9000
    assert sent[0][:6] == hs.announce(0x9000, True) and sent[0][6] == 0x16
    # then its session ticket, then done and close_notify in one write: the initiator, which installs its outbound
    # SA on done, is not woken a second time for the alert
    assert len(sent) == 3, [len(w) for w in sent]
    assert _records(sent[2]) == [0x17, 0x17]  # TLS 1.3 sends alerts encrypted, as application data


def _records(data: bytes) -> list[int]:
    """The content types of the TLS records `data` consists of (whole records only)."""
    types, at = [], 0
    while at < len(data):
        kind, length = data[at], int.from_bytes(data[at + 3 : at + 5], "big")
        types.append(kind)
        at += 5 + length
    assert at == len(data)
    return types


@pytest.mark.parametrize(
    ("byte", "flip", "message"),
    [
        (4, 1, "the initiator keyed with SPI 0x00009001, not the 0x00009000 announced"),
        # ESN "can" -> "cannot": both sides would key without ESN, consistently but not as announced
        (5, 1, "the initiator read ESN off in the announce, which said on"),
    ],
    ids=["spi", "esn"],
)
async def test_an_announce_altered_on_the_way_is_refused_before_the_responder_keys_anything(
    mesh: Mesh, byte: int, flip: int, message: str
) -> None:
    """Whoever rewrites the cleartext announce (its SPI, or its ESN bit) makes the initiator key with something
    the responder did not announce: the responder sees what the initiator read (echoed inside TLS) and refuses,
    before any key of its own."""
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller(spis=itertools.count(0x9000))
    done: asyncio.Future[hs.Result | hs.HandshakeError] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            got = await hs.read_preamble(reader)
            done.set_result(
                await hs.respond(reader, writer, got, plan(mesh.creds["b1"], identity("a1"), ins_r, a1, b1))
            )
        except hs.HandshakeError as err:
            done.set_result(err)
        finally:
            writer.close()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, alter: bool) -> None:
        while data := await src.read(1 << 16):
            if alter:  # one byte of the announce: type, SPI (4 bytes), flags
                data, alter = data[:byte] + bytes([data[byte] ^ flip]) + data[byte + 1 :], False
            dst.write(data)
        dst.close()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    middle = await asyncio.start_server(proxy, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", middle.sockets[0].getsockname()[1])
    with pytest.raises(hs.HandshakeError) as err:
        await hs.initiate(
            reader, writer, pod_preamble("a1", "b1"), plan(mesh.creds["a1"], identity("b1"), ins_i, a1, b1)
        )
    writer.close()
    responder = await asyncio.wait_for(done, 10)
    server.close()
    middle.close()
    assert isinstance(responder, hs.HandshakeError) and responder.code == "protocol"
    assert str(responder) == f"{message} (altered on the way?)"
    assert err.value.code == "refused" and "altered on the way" in str(err.value)
    assert ins_r.installed() == []  # nothing keyed on the responder
    assert ins_i.kinds() == ["propose", "inbound", "rollback"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "not a zt-bridge handshake (bad magic)"),
        (b"ZTB1\x01\x01\xff\xff", "preamble of 65535 bytes is too long"),
        (b"ZTB1\x01\x01\x00\x02{}", "malformed preamble"),
        (b"ZTB1\x07\x01\x00\x02{}", "malformed preamble"),
        (
            b'ZTB1\x01\x01\x00\x2f{"src":"a","dst":"b","key_bytes":24,"x":"yyyy"}',
            "unsupported key size 24 in the preamble",
        ),
        (b"ZTB1\x01", "connection closed before a complete preamble"),
        (b'ZTB1\x01\x01\x00\x1d{"src":"a","dst":"b","rev":0}', "bad revision 0 in the preamble"),
        (b'ZTB1\x01\x01\x00\x1f{"src":"a","dst":"b","rev":"2"}', "bad revision '2' in the preamble"),
    ],
)
async def test_bad_preambles_are_refused_by_name(raw: bytes, message: str) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    with pytest.raises(hs.HandshakeError) as err:
        await hs.read_preamble(reader)
    assert (err.value.code, str(err.value)) == ("protocol", message)


async def test_preamble_round_trip() -> None:
    pre = hs.Preamble(hs.Kind.REKEY_REQUEST, KeyScope.NODE, "node-a", "node-b")
    reader = asyncio.StreamReader()
    reader.feed_data(pre.encode())
    assert await hs.read_preamble(reader) == pre


@pytest.mark.parametrize(("body", "revision"), [(b"", 1), (b',"rev":2', 2), (b',"rev":7', hs.REVISION)])
async def test_a_preamble_says_which_revision_its_sender_speaks(body: bytes, revision: int) -> None:
    """None: a bridge from before the announce (revision 1). A later one than ours is answered in ours."""
    raw = b'{"src":"10.1.0.10","dst":"10.2.0.10","key_bytes":16' + body + b"}"
    reader = asyncio.StreamReader()
    reader.feed_data(b"ZTB1\x01\x01" + struct.pack("!H", len(raw)) + raw)
    assert (await hs.read_preamble(reader)).revision == revision


def test_a_bridge_that_predates_the_esn_field_keys_with_esn() -> None:
    assert hs.decode_message(b'{"t":"accept","spi":7}') == hs.Accept(7, esn=True)
    assert hs.decode_message(b'{"t":"ready","spi":7}') == hs.Ready(7, esn=True)


@pytest.mark.parametrize(
    ("initiator_esn", "responder_esn", "tunnel_esn"),
    [(True, True, True), (False, True, False), (True, False, False), (False, False, False)],
)
async def test_a_tunnel_keys_with_esn_only_when_both_sides_can(
    mesh: Mesh, initiator_esn: bool, responder_esn: bool, tunnel_esn: bool
) -> None:
    """An SA's sender and receiver must agree on ESN (it changes the ICV's input): one side behind an offload
    device without ESN offload makes the whole tunnel, all four SAs, key without it."""
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller(spis=itertools.count(0x9000))
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan(mesh.creds["a1"], identity("b1"), ins_i, a1, b1, esn=initiator_esn),
        lambda _: plan(mesh.creds["b1"], identity("a1"), ins_r, a1, b1, esn=responder_esn),
    )
    assert isinstance(out.initiator, hs.Result) and isinstance(out.responder, hs.Result), out
    assert out.initiator.esn is out.responder.esn is tunnel_esn
    assert ins_i.esn == [tunnel_esn, tunnel_esn] and ins_r.esn == [tunnel_esn]


async def test_a_responder_without_esn_refuses_an_initiator_that_keys_with_it(mesh: Mesh) -> None:
    """An initiator that ignores `accept.esn` (a bridge that predates it) would key ESN SAs the responder cannot
    match: the responder says so in-channel and keys nothing."""
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_r = RecordingInstaller()
    responded: asyncio.Future[hs.Result | hs.HandshakeError] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            got = await hs.read_preamble(reader)
            r_plan = plan(mesh.creds["b1"], identity("a1"), ins_r, a1, b1, esn=False)
            responded.set_result(await hs.respond(reader, writer, got, r_plan))
        except hs.HandshakeError as err:
            responded.set_result(err)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(dataclasses.replace(pod_preamble("a1", "b1"), revision=1).encode())  # an old initiator's
        channel = hs.TlsChannel(mesh.creds["a1"][1], server=False, reader=reader, writer=writer)
        await channel.handshake(flush=False)
        await channel.flush()
        accept = await channel.recv()
        await channel.send(hs.Ready(0x4242, esn=True))  # as an old initiator would, whatever accept said
        answer = await channel.recv()
        writer.close()
        result = await asyncio.wait_for(responded, 10)
    finally:
        server.close()
        await server.wait_closed()
    assert accept == hs.Accept(0x1000, esn=False)
    assert isinstance(answer, hs.Reject) and "offload device cannot do" in answer.reason
    assert isinstance(result, hs.HandshakeError) and result.code == "protocol"
    assert str(result) == "the initiator keys with ESN, which this side's offload device cannot do"
    assert ins_r.kinds() == ["alloc", "rollback"]  # nothing keyed on the responder


@pytest.mark.parametrize(
    "msg",
    [hs.Accept(0x1234), hs.Accept(0x1234, esn=False), hs.Ready(0xFFFF_FFFF), hs.Ready(7, esn=False), hs.Done(),
     hs.Ready(7, True, 0x9000, True), hs.Ready(7, False, 0x9000, False), hs.Reject("no"),
     hs.Reject("stale", full=True)],
)  # fmt: skip
def test_messages_round_trip(msg: hs.Message) -> None:
    encoded = hs.encode_message(msg)
    assert hs.decode_message(encoded[2:]) == msg


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"t":"accept","spi":0}', "bad SPI 0"),
        (b'{"t":"accept","spi":4294967296}', "bad SPI"),
        (b'{"t":"ready","spi":true}', "bad SPI True"),
        (b'{"t":"ready","spi":7,"esn":"no"}', "bad esn 'no'"),
        (b'{"t":"accept","spi":7,"esn":1}', "bad esn 1"),
        (b'{"t":"ready","spi":7,"peer_spi":8,"peer_esn":0}', "bad peer_esn 0"),
        (b'{"t":"offer","src":"a","dst":"b","key_bytes":16}', "unknown message 'offer'"),
        (b'{"t":"hello"}', "unknown message 'hello'"),
        (b'{"t":"reject","reason":"x","full":1}', "bad full 1"),
        (b"not json", "malformed message from the peer"),
    ],
)
def test_malformed_messages_are_protocol_errors(raw: bytes, fragment: str) -> None:
    with pytest.raises(hs.HandshakeError) as err:
        hs.decode_message(raw)
    assert err.value.code == "protocol" and fragment in str(err.value)


# --- resumption (psk_dhe_ke) -----------------------------------------------------------------------------------


async def _full_then(mesh: Mesh, **responder_kw: Any) -> tuple[hs.Result, RecordingInstaller]:
    """A full a1 -> b1 handshake; returns the initiator's result (its ticket inside) and installer."""
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_i = RecordingInstaller()
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan(mesh.creds["a1"], identity("b1"), ins_i, a1, b1),
        lambda _: plan(mesh.creds["b1"], identity("a1"), RecordingInstaller(spis=itertools.count(0x9000)), a1, b1,
                       **responder_kw),
    )  # fmt: skip
    assert isinstance(out.initiator, hs.Result) and isinstance(out.responder, hs.Result), out
    return out.initiator, ins_i


async def _rekey(
    mesh: Mesh, ticket: hs.Ticket | None, *, responder: str = "b1", expected: str = "b1", responder_ctx: Any = None
) -> tuple[Outcome, RecordingInstaller, RecordingInstaller]:
    """a1 -> b1 again, offering `ticket`, with the same SPIs as the first generation had."""
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller(spis=itertools.count(0x9000))
    cred_r = mesh.creds[responder] if responder_ctx is None else (mesh.creds[responder][0], responder_ctx)
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan(mesh.creds["a1"], identity(expected), ins_i, a1, b1, ticket=ticket),
        lambda _: plan(cred_r, identity("a1"), ins_r, a1, b1),
    )
    return out, ins_i, ins_r


async def test_a_resumed_rekey_makes_no_signature_and_gets_fresh_keys(mesh: Mesh) -> None:
    first, ins_first = await _full_then(mesh)
    assert (first.resumed, first.signatures) == (False, 1)  # a full handshake: one CertificateVerify per side
    assert first.ticket is not None and first.ticket.resumptions == 0
    assert first.ticket.peer.uri == identity("b1")

    out, ins_i, ins_r = await _rekey(mesh, first.ticket)
    ri, rr = out.initiator, out.responder
    assert isinstance(ri, hs.Result) and isinstance(rr, hs.Result), out
    assert (ri.resumed, ri.signatures, rr.resumed, rr.signatures) == (True, 0, True, 0)
    # the identities checked are those of the certificates the session was made with
    assert ri.peer_identity.uri == identity("b1") and rr.peer_identity.uri == identity("a1")
    assert ins_i.key("outbound") == ins_r.key("inbound") and ins_r.key("outbound") == ins_i.key("inbound")
    # same SPIs, same addresses as generation 1, yet other keys: the resumed session's own secret (fresh ECDHE)
    assert (ri.spi_in, ri.spi_out) == (first.spi_in, first.spi_out)
    assert ins_i.key("outbound") != ins_first.key("outbound") and ins_i.key("inbound") != ins_first.key("inbound")
    # the chain goes on: the next ticket counts this resumption and keeps the full handshake's time
    assert ri.ticket is not None and ri.ticket.resumptions == 1
    assert ri.ticket.chain_started == first.ticket.chain_started


async def test_a_session_whose_certificate_wds_no_longer_names_is_refused_then_a_full_handshake_passes(
    mesh: Mesh,
) -> None:
    """b1's address now belongs to cart (b2's identity) in WDS: the resumed session (made with ledger's
    certificate) is refused before any SPI, and the peer is told a full handshake may pass, which it does once
    the address's current pod presents its own certificate."""
    first, _ = await _full_then(mesh)
    out, ins_i, ins_r = await _rekey(mesh, first.ticket, expected="b2")
    assert isinstance(out.initiator, hs.HandshakeError) and out.initiator.code == "resumption", out
    assert "resumed a session made with spiffe://cluster.local/ns/payments/sa/ledger" in str(out.initiator)
    assert isinstance(out.responder, hs.HandshakeError) and out.responder.code == "resumption", out
    assert ins_i.calls == [] and ins_r.installed() == []  # the responder only chose its SPI

    again, ins_i, ins_r = await _rekey(mesh, None, responder="b2", expected="b2")
    assert isinstance(again.initiator, hs.Result) and not again.initiator.resumed and again.initiator.signatures == 1
    assert ins_i.key("outbound") == ins_r.key("inbound")


async def test_the_responder_refuses_a_session_whose_client_certificate_wds_no_longer_names(mesh: Mesh) -> None:
    first, _ = await _full_then(mesh)
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller()
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan(mesh.creds["a1"], identity("b1"), ins_i, a1, b1, ticket=first.ticket),
        lambda _: plan(mesh.creds["b1"], identity("a2"), ins_r, a1, b1),  # WDS: a1's address is debug's now
    )
    assert isinstance(out.responder, hs.HandshakeError) and out.responder.code == "resumption", out
    assert "resumed a session made with spiffe://cluster.local/ns/shop/sa/frontend" in str(out.responder)
    assert isinstance(out.initiator, hs.HandshakeError) and out.initiator.code == "resumption", out
    # the responder installed nothing; the initiator, which had verified the responder, keyed its inbound SA
    # before the responder had verified it, and removed it on the refusal
    assert ins_i.kinds() == ["propose", "inbound", "rollback"] and ins_r.installed() == []


async def test_a_resumed_session_is_checked_against_policy_like_a_full_one(mesh: Mesh) -> None:
    first, _ = await _full_then(mesh)
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller()
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan(mesh.creds["a1"], identity("b1"), ins_i, a1, b1, ticket=first.ticket),
        lambda _: plan(mesh.creds["b1"], identity("a1"), ins_r, a1, b1, recheck=lambda: "DENY policy x matched"),
    )
    assert isinstance(out.responder, hs.HandshakeError) and out.responder.code == "denied"
    # a denial is no reason to try a full handshake: the initiator sees a plain refusal
    assert isinstance(out.initiator, hs.HandshakeError) and out.initiator.code == "refused"
    # the responder installed nothing; the initiator, which had verified the responder, keyed its inbound SA
    # before the responder had verified it, and removed it on the refusal
    assert ins_i.kinds() == ["propose", "inbound", "rollback"] and ins_r.installed() == []


async def test_a_session_made_with_a_since_expired_certificate_is_refused(mesh: Mesh) -> None:
    first, _ = await _full_then(mesh)
    assert first.ticket is not None
    later = first.ticket.peer_not_after + dt.timedelta(seconds=1)
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan(mesh.creds["a1"], identity("b1"), RecordingInstaller(), a1, b1, ticket=first.ticket, wall=lambda: later),
        lambda _: plan(mesh.creds["b1"], identity("a1"), RecordingInstaller(), a1, b1),
    )
    assert isinstance(out.initiator, hs.HandshakeError) and out.initiator.code == "resumption"
    assert "certificate in the session expired" in str(out.initiator)


async def test_tls_steps_run_on_the_event_loop(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full handshake and a resumed one make no worker-thread hop: each step's crypto is less than the hop
    (0.7-0.9 ms in UML), and the BIOs are memory."""
    hops: list[str] = []
    real = asyncio.to_thread

    async def counted(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    first, _ = await _full_then(mesh)
    assert first.ticket is not None
    out, _, _ = await _rekey(mesh, first.ticket)
    assert isinstance(out.initiator, hs.Result) and out.initiator.resumed, out
    assert hops == []


async def test_n_resumptions_and_the_age_bound_force_a_full_handshake(mesh: Mesh) -> None:
    """Through a TicketStore as the bridge keeps them: at most 2 resumptions per full handshake, then full."""
    store = TicketStore(ResumptionPolicy(max_resumptions=2, max_age=100.0))
    key = TicketKey("192.168.50.2", Identity.parse(identity("a1")), Identity.parse(identity("b1")))
    ctx = mesh.creds["a1"][1]
    first, _ = await _full_then(mesh)
    assert first.ticket is not None
    store.put(key, first.ticket)
    modes = []
    for _ in range(4):
        out, _, _ = await _rekey(mesh, store.take(key, ctx, first.ticket.issued + 1))
        assert isinstance(out.initiator, hs.Result), out
        modes.append((out.initiator.resumed, out.initiator.signatures))
        assert out.initiator.ticket is not None
        store.put(key, out.initiator.ticket)
    assert modes == [(True, 0), (True, 0), (False, 1), (True, 0)]  # the third started a new chain
    assert store.dropped == {"resumptions": 1}
    # the age bound counts from the chain's full handshake, not from the last resumption
    ticket = store.take(key, ctx, 0.0)
    assert ticket is not None and ticket.resumptions == 1
    store.put(key, ticket)
    assert store.take(key, ctx, ticket.chain_started + 100.0) is None
    assert store.dropped["age"] == 1


async def test_concurrent_handshakes_of_one_pair_each_resume_a_session_of_their_own(mesh: Mesh) -> None:
    """A bulk rekey of several tunnels of one identity pair: the store holds up to per_pair sessions, newest
    first, each with its own chain, so every handshake that finds one resumes (with one session per pair, all
    but the first went full); the responder's budget for the pair is N x per_pair."""
    policy = ResumptionPolicy(max_resumptions=2, max_age=100.0, per_pair=3)
    store, chains = TicketStore(policy), ResumptionChains(policy, Clock())
    key = TicketKey("192.168.50.2", A1_ID, B1_ID)
    ctx = mesh.creds["a1"][1]
    for _ in range(4):  # four full handshakes: the oldest session is the surplus
        out, _ = await _chained(mesh, None, chains)
        assert _modes(out) == FULL and isinstance(out.initiator, hs.Result) and out.initiator.ticket is not None
        store.put(key, out.initiator.ticket)
    assert len(store) == 3 and store.dropped == {"surplus": 1}
    taken = [store.take(key, ctx, 0.0) for _ in range(4)]  # three at once, then none is left: a full one
    assert taken[3] is None and len(store) == 0
    results = await asyncio.gather(*(_chained(mesh, t, chains) for t in taken[:3]))
    assert [_modes(out) for out, _ in results] == [RESUMED] * 3
    for out, _ in results:
        assert isinstance(out.initiator, hs.Result) and out.initiator.ticket is not None
        assert out.initiator.ticket.resumptions == 1  # each carries on its own chain
        store.put(key, out.initiator.ticket)
    assert len(store) == 3
    # the responder counts the pair: 3 chains x 2 = 6 resumptions since its last full handshake, then Reject.full
    for _ in range(3):
        ticket = store.take(key, ctx, 0.0)
        assert ticket is not None and ticket.resumptions == 1
        out, _ = await _chained(mesh, ticket, chains)
        assert _modes(out) == RESUMED
    refused, _ = await _chained(mesh, ticket, chains)  # a seventh, offered by an initiator that ignores N
    assert isinstance(refused.responder, hs.HandshakeError), refused
    assert "6 resumptions since the last full handshake (at most 6)" in str(refused.responder)


def test_the_ticket_store_is_bounded_in_sessions_least_recently_used_pair_first() -> None:
    store = TicketStore(ResumptionPolicy(max_tickets=3, per_pair=2))
    keys = [TicketKey(f"192.168.50.{i}", A1_ID, B1_ID) for i in range(3)]
    ctx = SSL.Context(SSL.TLS_METHOD)
    tickets = [_fake_ticket(i, ctx) for i in range(5)]
    store.put(keys[0], tickets[0])
    store.put(keys[0], tickets[1])
    store.put(keys[1], tickets[2])
    store.put(keys[0], tickets[3])  # keys[0] holds its two newest; it is also the most recently used pair
    assert len(store) == 3 and store.dropped == {"surplus": 1}
    store.put(keys[2], tickets[4])  # four sessions: the least recently used pair (keys[1]) goes
    assert len(store) == 3 and store.dropped == {"surplus": 1, "evicted": 1}
    assert store.take(keys[1], ctx, 0.0) is None
    assert [store.take(keys[0], ctx, 0.0) for _ in range(3)] == [tickets[3], tickets[1], None]
    store.discard(keys[2], "gone")
    assert len(store) == 0 and store.dropped["gone"] == 1


def _fake_ticket(i: int, ctx: SSL.Context) -> hs.Ticket:
    """A ticket whose session is never used (the store only reads its bounds)."""
    return hs.Ticket(b"", ctx, B1_ID, b"", dt.datetime.now(dt.UTC), chain_started=0.0, resumptions=0, issued=float(i))


async def test_a_renewed_certificate_forces_a_full_handshake_on_either_side(mesh: Mesh) -> None:
    first, _ = await _full_then(mesh)
    assert first.ticket is not None
    # the responder renewed: its new context has new ticket keys and cannot read the ticket -> full handshake
    renewed = hs.tls_context(mesh.creds["b1"][0])
    out, ins_i, ins_r = await _rekey(mesh, first.ticket, responder_ctx=renewed)
    assert isinstance(out.initiator, hs.Result) and isinstance(out.responder, hs.Result), out
    assert (out.initiator.resumed, out.initiator.signatures, out.responder.signatures) == (False, 1, 1)
    assert ins_i.key("outbound") == ins_r.key("inbound")
    # the initiator renewed: its tickets belong to the old context and are not offered
    store = TicketStore(ResumptionPolicy())
    key = TicketKey("192.168.50.2", Identity.parse(identity("a1")), Identity.parse(identity("b1")))
    store.put(key, first.ticket)
    assert store.take(key, hs.tls_context(mesh.creds["a1"][0]), first.ticket.issued) is None
    assert store.dropped == {"renewed": 1}
    store.put(key, first.ticket)
    store.forget(Identity.parse(identity("a1")))  # what Certificates' renewal callback does
    assert len(store) == 0 and store.take(key, mesh.creds["a1"][1], first.ticket.issued) is None


# --- the responder's bounds: an initiator that keeps offering tickets cannot resume forever ----------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class WallClock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


A1_ID, B1_ID = Identity.parse(identity("a1")), Identity.parse(identity("b1"))
A1_AT_B = TicketKey(NODE_A_IP, B1_ID, A1_ID)  # a1's chain as node-b's responder keys it


async def _chained(
    mesh: Mesh, ticket: hs.Ticket | None, chains: ResumptionChains, *, responder: Any = None
) -> tuple[Outcome, RecordingInstaller]:
    """a1 -> b1 offering `ticket` whatever its bounds (None: a full handshake); the responder enforces `chains`."""
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_r = RecordingInstaller(spis=itertools.count(0x9000))
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan(mesh.creds["a1"], identity("b1"), RecordingInstaller(), a1, b1, ticket=ticket),
        lambda _: plan(responder or mesh.creds["b1"], identity("a1"), ins_r, a1, b1, chains=chains.bounds(A1_AT_B)),
    )
    return out, ins_r


def _modes(out: Outcome) -> tuple[bool, bool, int, int]:
    """(initiator resumed, responder resumed, initiator signatures, responder signatures)."""
    assert isinstance(out.initiator, hs.Result) and isinstance(out.responder, hs.Result), out
    return out.initiator.resumed, out.responder.resumed, out.initiator.signatures, out.responder.signatures


FULL, RESUMED = (False, False, 1, 1), (True, True, 0, 0)


async def test_the_responder_refuses_the_resumption_past_n_that_the_initiator_offers_anyway(mesh: Mesh) -> None:
    """An initiator that ignores its own bound (it offers every ticket it gets): the responder counts the pair's
    resumptions since its last full handshake and answers the third with Reject.full, before any SPI; the full
    handshake that follows starts a new chain. (One session per pair here: the budget is N x per_pair.)"""
    chains = ResumptionChains(ResumptionPolicy(max_resumptions=2, max_age=100.0, per_pair=1), Clock())
    out, _ = await _chained(mesh, None, chains)
    assert _modes(out) == FULL
    for _ in range(2):
        assert isinstance(out.initiator, hs.Result)
        out, _ = await _chained(mesh, out.initiator.ticket, chains)
        assert _modes(out) == RESUMED
    assert isinstance(out.initiator, hs.Result) and out.initiator.ticket is not None
    assert out.initiator.ticket.resumptions == 2  # what a well-behaved initiator would not offer again
    refused, ins_r = await _chained(mesh, out.initiator.ticket, chains)
    assert isinstance(refused.responder, hs.HandshakeError) and refused.responder.code == "resumption", refused
    assert "2 resumptions since the last full handshake (at most 2)" in str(refused.responder)
    # the initiator is told a full handshake may pass (Initiator.initiate runs one on a new connection)
    assert isinstance(refused.initiator, hs.HandshakeError) and refused.initiator.code == "resumption", refused
    assert ins_r.installed() == [] and chains.refused == {"resumptions": 1}
    full, _ = await _chained(mesh, None, chains)
    assert _modes(full) == FULL
    assert isinstance(full.initiator, hs.Result)
    again, _ = await _chained(mesh, full.initiator.ticket, chains)
    assert _modes(again) == RESUMED


async def test_the_responder_bounds_a_chains_age_on_its_own_clock(mesh: Mesh) -> None:
    """From the pair's last full handshake here, not from the ticket: each resumption brings a fresh ticket."""
    clock = Clock()
    chains = ResumptionChains(ResumptionPolicy(max_resumptions=8, max_age=100.0), clock)
    first, _ = await _chained(mesh, None, chains)
    assert isinstance(first.initiator, hs.Result)
    clock.now += 60
    mid, _ = await _chained(mesh, first.initiator.ticket, chains)
    assert _modes(mid) == RESUMED and isinstance(mid.initiator, hs.Result)
    clock.now += 40  # 40 s after the ticket it offers was issued, 100 s after the chain's full handshake
    late, _ = await _chained(mesh, mid.initiator.ticket, chains)
    assert isinstance(late.responder, hs.HandshakeError) and late.responder.code == "resumption", late
    assert "the last full handshake ran 100s ago (at most 100s)" in str(late.responder)
    assert isinstance(late.initiator, hs.HandshakeError) and late.initiator.code == "resumption"
    assert chains.refused == {"age": 1}


async def test_a_responder_that_holds_no_chain_for_the_pair_takes_no_resumption(mesh: Mesh) -> None:
    """Its memory is bounded: a pair it forgot (or a bridge with resumption off) gets a full handshake, so
    forgetting never lets a chain grow."""
    chains = ResumptionChains(ResumptionPolicy(max_tickets=1), Clock())
    first, _ = await _chained(mesh, None, chains)
    assert isinstance(first.initiator, hs.Result)
    chains.full(TicketKey(NODE_A_IP, Identity.parse(identity("b2")), A1_ID))  # another pair evicts a1's
    assert len(chains) == 1
    out, _ = await _chained(mesh, first.initiator.ticket, chains)
    assert isinstance(out.responder, hs.HandshakeError) and "no full handshake with this peer" in str(out.responder)
    assert isinstance(out.initiator, hs.HandshakeError) and out.initiator.code == "resumption"
    off = ResumptionChains(ResumptionPolicy(enabled=False), Clock())
    first, _ = await _chained(mesh, None, off)
    assert isinstance(first.initiator, hs.Result)
    out, _ = await _chained(mesh, first.initiator.ticket, off)
    assert isinstance(out.responder, hs.HandshakeError) and "resumption is off on this bridge" in str(out.responder)
    assert (chains.refused, off.refused) == ({"unknown": 1}, {"off": 1})


def _rewound(ticket: hs.Ticket) -> hs.Ticket:
    """The ticket with its session's issue time set to now, as a modified initiator could make it: OpenSSL's
    client side then offers it whatever its age (the time is `[1] EXPLICIT INTEGER` in the SSL_SESSION DER)."""
    der = ticket.der
    now = int(time.time())

    def is_time(i: int) -> bool:
        n = der[i + 3]
        return der[i] == 0xA1 and der[i + 1] == n + 2 and der[i + 2] == 0x02 and abs(
            int.from_bytes(der[i + 4 : i + 4 + n]) - now) < 60  # fmt: skip

    at = next(i for i in range(len(der) - 4) if is_time(i))
    n = der[at + 3]
    der = der[: at + 4] + now.to_bytes(n) + der[at + 4 + n :]
    return dataclasses.replace(ticket, der=der)


def _client_hello_extensions(msg: bytes) -> set[int]:
    body = msg[4:]
    pos = 2 + 32
    pos += 1 + body[pos]  # legacy_session_id
    pos += 2 + int.from_bytes(body[pos : pos + 2])  # cipher_suites
    pos += 1 + body[pos]  # legacy_compression_methods
    end, pos, found = pos + 2 + int.from_bytes(body[pos : pos + 2]), pos + 2, set()
    while pos < end:
        found.add(int.from_bytes(body[pos : pos + 2]))
        pos += 4 + int.from_bytes(body[pos + 2 : pos + 4])
    return found


async def test_openssl_takes_no_expired_ticket_on_the_server_even_when_the_client_offers_it(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server side of the ticket lifetime (a context's timeout), with an initiator that offers an expired
    ticket anyway: OpenSSL answers with a full handshake. (It counts the lifetime from each ticket's issue, and
    every resumption issues a new ticket: that is why the responder bounds a chain's age itself.) OpenSSL reads
    its own wall clock, so real time has to pass."""
    offered: list[bool] = []
    record = hs.HandshakeTrace.record

    def spy(self: hs.HandshakeTrace, sent: bool, msg: bytes) -> None:
        if sent and msg[:1] == b"\x01":  # ClientHello: did the client offer a PSK (pre_shared_key, 41)?
            offered.append(41 in _client_hello_extensions(msg))
        record(self, sent, msg)

    monkeypatch.setattr(hs.HandshakeTrace, "record", spy)
    # 3 s: the second handshake below must come within the lifetime even on a loaded host (1 s did not, in CI)
    lifetime = 3
    server = (mesh.creds["b1"][0], hs.tls_context(mesh.creds["b1"][0], ticket_lifetime=lifetime))
    chains = ResumptionChains(ResumptionPolicy(), Clock())
    first, _ = await _chained(mesh, None, chains, responder=server)
    issued = time.monotonic()
    assert isinstance(first.initiator, hs.Result) and first.initiator.ticket is not None
    fresh, _ = await _chained(mesh, _rewound(first.initiator.ticket), chains, responder=server)
    assert _modes(fresh) == RESUMED  # the rewritten session itself is fine
    # OpenSSL counts whole seconds: 1.5 s past the lifetime, whatever the rounding
    await asyncio.sleep(max(0.0, issued + lifetime + 1.5 - time.monotonic()))
    offered.clear()
    late, _ = await _chained(mesh, _rewound(first.initiator.ticket), chains, responder=server)
    assert offered == [True] and _modes(late) == FULL
    assert chains.refused == {}  # OpenSSL did not resume: nothing for the bridge to refuse


# --- ticket-key rotation and renewal ------------------------------------------------------------------------------


async def test_a_rotated_responder_context_takes_no_old_ticket_and_the_new_ones_resume(mesh: Mesh) -> None:
    """Certificates makes a new context (new ticket keys) every ticket lifetime on its injected clock: a ticket
    from the old one gets a full handshake (both sides sign; the initiator's next ticket starts a new chain), and
    the tickets of the new context resume."""
    wall = WallClock()
    certs = Certificates(mesh.secrets["node-b"], wall, ticket_lifetime=60)
    chains = ResumptionChains(ResumptionPolicy(), Clock())
    b1 = await certs.credential(B1_ID, 10)
    first, _ = await _chained(mesh, None, chains, responder=b1)
    assert _modes(first) == FULL and isinstance(first.initiator, hs.Result)
    wall.now += dt.timedelta(seconds=59)
    assert (await certs.credential(B1_ID, 10))[1] is b1[1]  # within the lifetime: the same context
    resumed, _ = await _chained(mesh, first.initiator.ticket, chains, responder=b1)
    assert _modes(resumed) == RESUMED and isinstance(resumed.initiator, hs.Result)
    assert resumed.initiator.ticket is not None and resumed.initiator.ticket.resumptions == 1
    wall.now += dt.timedelta(seconds=1)
    rotated = await certs.credential(B1_ID, 10)
    assert rotated[1] is not b1[1]
    old, _ = await _chained(mesh, resumed.initiator.ticket, chains, responder=rotated)
    assert _modes(old) == FULL  # the new keys cannot read the old ticket: OpenSSL runs a full handshake
    assert isinstance(old.initiator, hs.Result) and old.initiator.ticket is not None
    assert old.initiator.ticket.resumptions == 0 and chains.refused == {}
    new, _ = await _chained(mesh, old.initiator.ticket, chains, responder=rotated)
    assert _modes(new) == RESUMED


async def test_handshakes_that_ask_at_once_share_one_new_context(mesh: Mesh) -> None:
    """A pod's first burst of new pairs: every handshake asks for its identity's context before the first is
    built. One context is built and all get it (each used to build and keep its own, and the tickets made with
    the ones not kept were refused as "renewed"); a waiter whose deadline passes does not cancel the others'."""
    wall = WallClock()
    certs = Certificates(mesh.secrets["node-b"], wall, ticket_lifetime=60)
    await certs.credential(B1_ID, 10)  # the SVID is there; its context is built from here on
    wall.now += dt.timedelta(seconds=60)  # ... and is due for rotation
    impatient = asyncio.ensure_future(certs.credential(B1_ID, 10))
    await asyncio.sleep(0)
    impatient.cancel()
    got = await asyncio.gather(*(certs.credential(B1_ID, 10) for _ in range(8)))
    assert len({id(ctx) for _, ctx in got}) == 1
    assert (await certs.credential(B1_ID, 10))[1] is got[0][1]  # the one kept


def _counting_builds(monkeypatch: pytest.MonkeyPatch) -> list[Identity]:
    """The identities whose TLS context Certificates builds, in order."""
    built: list[Identity] = []
    real = certs_module.tls_context

    def counted(cred: hs.Credential, **kwargs: Any) -> SSL.Context:
        built.append(cred.identity)
        return real(cred, **kwargs)

    monkeypatch.setattr(certs_module, "tls_context", counted)
    return built


async def test_a_wanted_identitys_context_is_built_before_its_first_handshake(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ztunnel prefetches its local workloads' certificates: the context is there when the first handshake of
    an identity asks (it used to be built then, on the responder's critical path: 2-9 ms in UML). An identity no
    longer wanted loses its context."""
    built = _counting_builds(monkeypatch)
    certs = Certificates(mesh.secrets["node-b"], WallClock(), ticket_lifetime=60)
    certs.want({B1_ID})
    await eventually(lambda: built == [B1_ID], what="the context built ahead")
    await asyncio.sleep(0.05)
    cred, ctx = await certs.credential(B1_ID, 10)
    assert built == [B1_ID] and cred.identity == B1_ID
    assert (await certs.credential(B1_ID, 10))[1] is ctx
    certs.want(set())
    assert (await certs.credential(B1_ID, 10))[1] is not ctx and built == [B1_ID, B1_ID]


async def test_an_old_context_is_rebuilt_behind_the_handshake_that_notices(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past REFRESH_AT of the ticket lifetime a handshake still gets the current context, and a new one is built
    beside it for the next: no handshake waits for a rotation that was due."""
    built = _counting_builds(monkeypatch)
    wall = WallClock()
    certs = Certificates(mesh.secrets["node-b"], wall, ticket_lifetime=100)
    _, first = await certs.credential(B1_ID, 10)
    await asyncio.sleep(0.05)
    assert len(built) == 1
    wall.now += dt.timedelta(seconds=89)
    assert (await certs.credential(B1_ID, 10))[1] is first and len(built) == 1  # not due yet
    wall.now += dt.timedelta(seconds=1)
    assert (await certs.credential(B1_ID, 10))[1] is first  # due: this one keeps the current context
    await eventually(lambda: len(built) == 2, what="the context rebuilt behind")
    await asyncio.sleep(0.05)
    _, second = await certs.credential(B1_ID, 10)
    assert second is not first and len(built) == 2
    wall.now += dt.timedelta(seconds=10)  # the first context's whole lifetime: the new one is in use already
    assert (await certs.credential(B1_ID, 10))[1] is second and len(built) == 2


async def test_a_renewal_on_either_side_forces_a_full_handshake_on_both(mesh: Mesh) -> None:
    """Through the real renewal path: SecretManager.renew_now issues a new SVID, Certificates sees the new serial
    (its renewal callbacks run: the initiator's tickets go) and makes a new context."""
    certs_a, certs_b = mesh.certs["node-a"], mesh.certs["node-b"]
    renewed: dict[str, asyncio.Queue[Identity]] = {"a": asyncio.Queue(), "b": asyncio.Queue()}
    certs_a.on_renewed(renewed["a"].put_nowait)
    certs_b.on_renewed(renewed["b"].put_nowait)
    store = TicketStore(ResumptionPolicy())
    certs_a.on_renewed(store.forget)  # what Generations does
    chains = ResumptionChains(ResumptionPolicy(), Clock())
    key = TicketKey(NODE_B_IP, A1_ID, B1_ID)
    a1, b1 = PODS["a1"][4], PODS["b1"][4]

    async def handshake() -> tuple[bool, bool, int, int]:
        cred_a, cred_b = await certs_a.credential(A1_ID, 10), await certs_b.credential(B1_ID, 10)
        out = await run_pair(
            pod_preamble("a1", "b1"),
            plan(cred_a, identity("b1"), RecordingInstaller(), a1, b1, ticket=store.take(key, cred_a[1], 0.0)),
            lambda _: plan(cred_b, identity("a1"), RecordingInstaller(), a1, b1, chains=chains.bounds(A1_AT_B)),
        )
        assert isinstance(out.initiator, hs.Result) and out.initiator.ticket is not None, out
        store.put(key, out.initiator.ticket)
        return _modes(out)

    assert [await handshake(), await handshake()] == [FULL, RESUMED]
    mesh.secrets["node-b"].renew_now(B1_ID)  # the responder renews
    assert await asyncio.wait_for(renewed["b"].get(), 10) == B1_ID
    assert [await handshake(), await handshake()] == [FULL, RESUMED]
    mesh.secrets["node-a"].renew_now(A1_ID)  # the initiator renews
    assert await asyncio.wait_for(renewed["a"].get(), 10) == A1_ID
    assert len(store) == 0 and store.dropped == {"renewed": 1}
    assert [await handshake(), await handshake()] == [FULL, RESUMED]
    assert chains.refused == {}


def _allow_psk_ke(cred: hs.Credential) -> Any:
    ctx = hs.tls_context(cred)
    ctx.set_options(_ALLOW_NO_DHE_KEX | _PREFER_NO_DHE_KEX)  # what a misconfigured or hostile peer would run
    return ctx


_ALLOW_NO_DHE_KEX = 1 << 10  # OpenSSL's SSL_OP_ALLOW_NO_DHE_KEX / SSL_OP_PREFER_NO_DHE_KEX (never set by us)
_PREFER_NO_DHE_KEX = 1 << 35


async def test_psk_ke_is_never_accepted(mesh: Mesh) -> None:
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    # both ends configured to resume without ECDHE: our channel refuses the handshake on either side
    client, server = _allow_psk_ke(mesh.creds["a1"][0]), _allow_psk_ke(mesh.creds["b1"][0])
    cred_a, cred_b = (mesh.creds["a1"][0], client), (mesh.creds["b1"][0], server)
    first = await run_pair(
        pod_preamble("a1", "b1"),
        plan(cred_a, identity("b1"), RecordingInstaller(), a1, b1),
        lambda _: plan(cred_b, identity("a1"), RecordingInstaller(), a1, b1),
    )
    assert isinstance(first.initiator, hs.Result) and first.initiator.ticket is not None
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller()
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan(cred_a, identity("b1"), ins_i, a1, b1, ticket=first.initiator.ticket),
        lambda _: plan(cred_b, identity("a1"), ins_r, a1, b1),
    )
    # the initiator reads the ServerHello first and stops before its Finished: the responder never completes
    assert isinstance(out.initiator, hs.HandshakeError) and out.initiator.code == "tls", out
    assert str(out.initiator) == "the session was resumed with psk_ke (no ECDHE); only psk_dhe_ke is allowed"
    assert isinstance(out.responder, hs.HandshakeError) and out.responder.code == "tls", out
    assert ins_i.calls == [] and ins_r.installed() == []  # the responder only chose its SPI

    # our responder, offered psk_ke by such a client, picks psk_dhe_ke (OpenSSL: ALLOW_NO_DHE_KEX is not set)
    first = await run_pair(
        pod_preamble("a1", "b1"),
        plan(cred_a, identity("b1"), RecordingInstaller(), a1, b1),
        lambda _: plan(mesh.creds["b1"], identity("a1"), RecordingInstaller(), a1, b1),
    )
    assert isinstance(first.initiator, hs.Result)
    out = await run_pair(
        pod_preamble("a1", "b1"),
        plan(cred_a, identity("b1"), RecordingInstaller(), a1, b1, ticket=first.initiator.ticket),
        lambda _: plan(mesh.creds["b1"], identity("a1"), RecordingInstaller(), a1, b1),
    )
    assert isinstance(out.responder, hs.Result) and out.responder.resumed and out.responder.signatures == 0


def _server_hello(*extensions: int) -> bytes:
    exts = b"".join(struct.pack("!HH", e, 2) + b"\x00\x17" for e in extensions)
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x13\x01" + b"\x00" + struct.pack("!H", len(exts)) + exts
    return bytes([2]) + len(body).to_bytes(3) + body


def test_the_key_exchange_is_read_from_the_server_hello() -> None:
    assert hs.key_exchange(hs.hello_extensions(_server_hello(43, 51))) == "full"
    assert hs.key_exchange(hs.hello_extensions(_server_hello(43, 51, 41))) == "psk_dhe_ke"
    assert hs.key_exchange(hs.hello_extensions(_server_hello(43, 41))) == "psk_ke"
    for bad, why in ((_server_hello(43)[:-3], "overrun"), (b"\x01\x00\x00\x00", "not a ServerHello")):
        with pytest.raises(ValueError, match=why):
            hs.hello_extensions(bad)


def test_resumption_policy_bounds_are_checked() -> None:
    for kw, why in (
        ({"max_resumptions": -1}, "negative"),
        ({"max_age": 8 * 24 * 3600.0}, "at most 7 days"),
        ({"max_age": 0.0}, "positive"),
        ({"max_tickets": 0}, "at least 1"),
    ):
        with pytest.raises(ValueError, match=why):
            ResumptionPolicy(**kw)
    with pytest.raises(ValueError, match="at most 7 days"):
        hs.tls_context(_foreign_credential(identity("a1"), b""), ticket_lifetime=8 * 24 * 3600)
