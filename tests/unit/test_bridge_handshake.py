"""The bridge handshake with real TLS 1.3 over real TCP, certificates from a real in-process ztd (impersonation
by node-bound bridge tokens), and a recording installer in place of XFRM (the host kernel has no ESP; the
kernel test programs the real thing). What is checked: both ends derive the same two directional keys,
bound to the SPIs; identity and admission are verified on both sides before any SPI exists; a spoofed
address, an impostor responder and a foreign CA get no tunnel; the wire format refuses garbage clearly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
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

from ipsec_bridge import handshake as hs
from ipsec_bridge.certs import Certificates
from ipsec_bridge.keys import KeyScope
from ipsec_bridge.xfrm.messages import Aead
from tests.helpers import running_ztd
from tests.support.bridge_mesh import PODS, identity, write_mesh
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

    def key(self, kind: str) -> bytes:
        found: bytes = next(c[2] for c in self.calls if c[0] == kind)
        return found


@dataclass
class Mesh:
    """Each pod's SVID (with its TLS context), issued to its node's bridge by impersonation."""

    creds: dict[str, tuple[hs.Credential, Any]]


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
            yield Mesh(creds)
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
    preamble: hs.Preamble, initiator_plan: hs.Plan, responder_plan: Callable[[hs.Preamble], hs.Plan]
) -> Outcome:
    """One handshake over loopback TCP: the responder reads the preamble, resolves a plan, responds."""
    done: asyncio.Future[hs.Result | hs.HandshakeError] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            got = await hs.read_preamble(reader)
            done.set_result(await hs.respond(reader, writer, got, responder_plan(got)))
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


async def test_both_ends_derive_the_same_directional_keys_bound_to_their_spis(mesh: Mesh) -> None:
    a1, b1 = PODS["a1"][4], PODS["b1"][4]
    ins_i, ins_r = RecordingInstaller(), RecordingInstaller(spis=itertools.count(0x9000))
    i_plan = plan(mesh.creds["a1"], identity("b1"), ins_i, a1, b1)
    r_plan = plan(mesh.creds["b1"], identity("a1"), ins_r, a1, b1)
    out = await run_pair(pod_preamble("a1", "b1"), i_plan, lambda _: r_plan)
    assert isinstance(out.initiator, hs.Result) and isinstance(out.responder, hs.Result), out
    ri, rr = out.initiator, out.responder
    # each side allocates its inbound SPI only; the peer's inbound SPI is its outbound one
    assert (ri.spi_in, ri.spi_out, rr.spi_in, rr.spi_out) == (0x1000, 0x9000, 0x9000, 0x1000)
    assert ri.peer_identity.uri == identity("b1") and rr.peer_identity.uri == identity("a1")
    # the order that makes the switch lossless: nothing outbound before the peer can decrypt it
    assert ins_r.kinds() == ["alloc", "inbound", "outbound"]
    assert ins_i.kinds() == ["alloc", "inbound", "outbound"]
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
    assert ins_i.calls == [] and ins_r.calls == []  # no SPI was allocated, no key exists, on either side


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
    # the refusal travels with the initiator's Finished: the responder never reserves an SPI
    assert ins_i.calls == [] and ins_r.calls == []


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
    assert ins_i.calls == [] and ins_r.calls == []


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
    assert ins_i.calls == [] and ins_r.calls == []


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
        writer.write(pod_preamble("a1", "b1").encode())
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
     hs.Reject("no")],
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
        (b'{"t":"offer","src":"a","dst":"b","key_bytes":16}', "unknown message 'offer'"),
        (b'{"t":"hello"}', "unknown message 'hello'"),
        (b"not json", "malformed message from the peer"),
    ],
)
def test_malformed_messages_are_protocol_errors(raw: bytes, fragment: str) -> None:
    with pytest.raises(hs.HandshakeError) as err:
        hs.decode_message(raw)
    assert err.value.code == "protocol" and fragment in str(err.value)
