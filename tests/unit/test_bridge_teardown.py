"""Idle reclaim on both bridges together (on-demand set-up): the teardown request, its answers and its order.

Two real TunnelManagers (node-a, node-b) with `--setup on-demand`, real handshakes over loopback TCP with real
SVIDs from an in-process ztd, hand-moved monotonic clocks, and one stand-in kernel per node that keeps the SAs
(with byte counters the test sets) and the policies, and writes every change into one log both nodes share, in
order. What is checked: an idle pair goes on both sides, the peer stopping first, so no side ever sends under an
SA the other no longer has; a peer that saw bytes (or runs a handshake, or sets up eagerly, or is asked from
another address) keeps the pair on both sides; a peer that predates the request, or does not answer, leaves
this side to reclaim alone, as before, logged once; both sides asking at once still ends with one teardown.
The real kernel's side (ACQUIRE after the reclaim) is in tests/kernel/test_bridge_ondemand_kernel.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any, cast

import pytest

from ipsec_bridge import handshake as hs
from ipsec_bridge.certs import Certificates
from ipsec_bridge.keys import KeyScope
from ipsec_bridge.netns import Netns
from ipsec_bridge.sa_manager import SaManager, SaSettings
from ipsec_bridge.tunnels.manager import TunnelManager
from ipsec_bridge.tunnels.ondemand import OnDemand
from ipsec_bridge.tunnels.records import Tunnel
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import PolicyDir, XfrmMsg
from ipsec_bridge.xfrm.netlink import XfrmError
from tests.helpers import running_ztd
from tests.support.bridge_mesh import PODS, load_view, write_mesh
from tests.support.wait import eventually
from tests.support.xfrm_samples import sa_v4
from ztcore.identity import Identity
from ztcore.identity.caclient import CAClient, CAClientOptions
from ztcore.identity.manager import RotationPolicy, SecretManager
from ztcore.metrics import Registry

BRIDGE = Identity("cluster.local", "istio-system", "ztunnel")
A1, B1, B2 = PODS["a1"][4], PODS["b1"][4], PODS["b2"][4]
IDLE = 60.0  # --idle-timeout of both bridges: checks every 5 s


@dataclass(frozen=True)
class Event:
    node: str  # "a" or "b"
    op: str  # "sa", "delsa", "policy", "delpolicy"
    what: Any  # SPI, or the policy's direction


class Kernel:
    """One node's XFRM state as the bridge writes it, answering like the kernel (ENOENT for what is not there)."""

    def __init__(self, node: str, log: list[Event]) -> None:
        self.node = node
        self.log = log
        self.sas: dict[tuple[Any, int], m.SecurityAssociation] = {}
        self.bytes: dict[int, int] = {}  # SPI -> bytes the SA carried (the test moves them)
        self.policies: dict[bytes, m.Policy] = {}
        self.refill: m.Policy | None = None  # put into the slot of the next out policy deleted (an ACQUIRE's hold)
        self._spis = itertools.count(0x2000 if node == "a" else 0x3000)

    def runs_inline(self, requests: Sequence[m.Request]) -> bool:
        return True  # call_each never suspends

    async def call_each(self, requests: Sequence[m.Request]) -> list[list[m.NetlinkMessage] | XfrmError]:
        out: list[list[m.NetlinkMessage] | XfrmError] = []
        for r in requests:
            reply: list[m.NetlinkMessage] | XfrmError = []
            if r.type == XfrmMsg.ALLOCSPI:
                larval = dataclasses.replace(sa_v4(), spi=next(self._spis))
                reply = [m.NetlinkMessage(XfrmMsg.NEWSA, 0, 0, 0, m.encode_sa(larval))]
            elif r.type in (XfrmMsg.NEWSA, XfrmMsg.UPDSA):
                sa = m.decode_sa(r.payload).sa
                self.sas[(sa.dst, sa.spi)] = sa
                self.log.append(Event(self.node, "sa", sa.spi))
            elif r.type == XfrmMsg.DELSA:
                sid = m.decode_sa_id(r.payload)
                if self.sas.pop((sid.dst, sid.spi), None) is None:
                    reply = XfrmError("DELSA", errno.ESRCH)
                else:
                    self.log.append(Event(self.node, "delsa", sid.spi))
            elif r.type in (XfrmMsg.NEWPOLICY, XfrmMsg.UPDPOLICY):
                policy = m.decode_policy(r.payload).policy
                self.policies[m.delete_policy(policy.id()).payload] = policy
                self.log.append(Event(self.node, "policy", policy.direction))
            elif r.type == XfrmMsg.DELPOLICY:
                gone = self.policies.pop(r.payload, None)
                if gone is None:
                    reply = XfrmError("DELPOLICY", errno.ENOENT)
                else:
                    self.log.append(Event(self.node, "delpolicy", gone.direction))
                    if self.refill is not None and gone.direction == PolicyDir.OUT:
                        self.policies[r.payload], self.refill = self.refill, None
            out.append(reply)
        return out

    async def add_policies(self, policies: Sequence[m.Policy], *, update: bool = False) -> None:
        pass  # the local pods' bypass and trap policies (reconcile)

    def info(self, sa: m.SecurityAssociation) -> m.SaInfo:
        return m.SaInfo(sa, m.LifetimeCurrent(self.bytes.get(sa.spi, 0)))

    async def list_sas(self) -> list[m.SaInfo]:
        return [self.info(sa) for sa in self.sas.values()]

    async def sa_counters(self) -> list[m.SaCounters]:
        return [m.SaCounters.of(self.info(sa)) for sa in self.sas.values()]

    async def get_sa(self, sid: m.SaId) -> m.SaInfo:
        sa = self.sas.get((sid.dst, sid.spi))
        if sa is None:
            raise XfrmError("GETSA", errno.ESRCH)
        return self.info(sa)


class LoopbackNetns(Netns):
    """Both bridges run on this host: the peer node's bridge is whatever listens on `port`."""

    def __init__(self) -> None:
        super().__init__(None)
        self.port = 0

    async def connect(
        self, host: str, port: int, connect_s: float, source: str | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Node:
    name: str
    manager: TunnelManager
    kernel: Kernel
    clock: Clock
    registry: Registry
    netns: LoopbackNetns
    port: int = 0
    served: list[tuple[str, ...]] = field(default_factory=list)  # teardown requests that reached on-demand

    @property
    def od(self) -> OnDemand:
        assert self.manager.on_demand is not None
        return self.manager.on_demand

    def reasons(self) -> list[str]:
        return [r["reason"] for r in self.manager.removals]

    def reclaims(self) -> float:
        lines = [x for x in self.registry.render().splitlines() if x.startswith("zt_bridge_reclaims_total ")]
        return float(lines[0].split()[1]) if lines else 0.0


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[dict[str, Node]]:
    """node-a and node-b on demand, each serving the other on loopback (source checks off: both are 127.0.0.1)."""
    store = await load_view(write_mesh(tmp_path / "mesh"))
    log: list[Event] = []
    async with running_ztd(tmp_path, config_dir=write_mesh(tmp_path / "ztd")) as rz, contextlib.AsyncExitStack() as st:
        out: dict[str, Node] = {}
        for name in ("a", "b"):
            token = tmp_path / f"{name}.token"
            token.write_text(rz.token("istio-system/ztunnel", node=f"node-{name}"))
            options = CAClientOptions(
                address=f"127.0.0.1:{rz.cfg.secure_port}", root_cert=rz.cfg.published_root, token_file=token
            )
            ca = CAClient(options)
            st.push_async_callback(ca.close)
            secrets = SecretManager(ca, RotationPolicy(), credential_identity=BRIDGE)
            task = asyncio.create_task(secrets.run())
            st.callback(task.cancel)
            kernel, clock, registry, netns = Kernel(name, log), Clock(), Registry(), LoopbackNetns()
            sa = SaManager(cast(Any, kernel), SaSettings(mesh_cidrs=store.settings.mesh_cidrs, on_demand=True))
            settings = BridgeSettings(
                node=f"node-{name}", on_demand=True, idle_timeout=IDLE, handshake_timeout=2.0, grace=0.5,
                check_source_address=False,
            )  # fmt: skip
            manager = TunnelManager(
                settings, store, sa, Certificates(secrets), netns, BridgeMetrics(registry), monotonic=clock
            )
            await manager.reconcile(store.view)
            node = out[name] = Node(name, manager, kernel, clock, registry, netns)
            handler = manager.responder.on_teardown
            assert handler is not None  # on demand: the manager wires the peers in

            async def counting(t: Tunnel, *rest: Any, node: Node = node, handler: Any = handler) -> None:
                node.served.append(t.spec.key)
                await handler(t, *rest)

            manager.responder.on_teardown = counting
            server = await asyncio.start_server(manager.serve_connection, "127.0.0.1", 0)
            st.push_async_callback(server.wait_closed)
            st.callback(server.close)
            node.port = server.sockets[0].getsockname()[1]
        out["a"].netns.port, out["b"].netns.port = out["b"].port, out["a"].port
        for name, pods in (("a", ("a1",)), ("b", ("b1", "b2"))):  # SVIDs issued ahead, as a running bridge has them
            for pod in pods:
                await out[name].manager.certs.credential(Identity.parse(_uri(pod)), 10)
        yield out


def _uri(pod: str) -> str:
    ns, sa, *_ = PODS[pod]
    return f"spiffe://cluster.local/ns/{ns}/sa/{sa}"


async def up(initiator: Node, responder: Node, local: str, peer: str) -> tuple[Tunnel, Tunnel]:
    """The pair's tunnel on both nodes, as a first packet would make it (the initiator's record, its handshake)."""
    t = initiator.od.activate(("pod", local, peer))
    assert t is not None
    await initiator.manager.initiator.initiate(t)
    other = responder.manager.tunnels[("pod", peer, local)]
    assert t.current is not None and other.current is not None, (t.last_error, other.last_error)
    return t, other


async def idle(*nodes: Node) -> None:
    """Every node reads its counters once (nothing moved since the handshake), then IDLE seconds pass."""
    for node in nodes:
        assert await node.od.reclaim_idle() == []
    for node in nodes:
        node.clock.now += IDLE


def at(log: list[Event], node: str, op: str, what: Any) -> int:
    return next(i for i, e in enumerate(log) if (e.node, e.op, e.what) == (node, op, what))


def removals(log: list[Event]) -> list[Event]:
    return [e for e in log if e.op.startswith("del")]


async def test_an_idle_pair_goes_on_both_sides_and_the_peer_stops_sending_first(nodes: dict[str, Node]) -> None:
    a, b = nodes["a"], nodes["b"]
    ta, tb = await up(a, b, A1, B1)
    assert ta.current is not None
    a_in, a_out = ta.current.spi_in, ta.current.spi_out  # node-b's out and in SAs
    await idle(a, b)
    start = len(a.kernel.log)
    assert await a.od.reclaim_idle() == [ta]
    await eventually(b.reasons, 5, "node-b's side of the pair to go")  # the record comes when it is gone
    assert a.manager.tunnels == {} and ta.removed and tb.removed
    assert a.reasons() == ["idle: reclaimed with the peer"] and b.reasons() == ["idle: reclaimed by the peer"]
    assert (a.reclaims(), b.reclaims()) == (1, 1)
    assert list(a.od.reclaimed) == [("pod", A1, B1)] and list(b.od.reclaimed) == [("pod", B1, A1)]
    log = a.kernel.log[start:]
    # node-b stops sending (its out policy) before anything else goes; node-a's SAs go only after that
    assert log[0] == Event("b", "delpolicy", PolicyDir.OUT)
    assert at(log, "b", "delpolicy", PolicyDir.OUT) < at(log, "a", "delsa", a_in)  # b->a: sender stopped first
    assert at(log, "a", "delpolicy", PolicyDir.OUT) < at(log, "b", "delsa", a_out)  # a->b: likewise
    for node in ("a", "b"):  # and on each side, policies first, SAs after
        kinds = [e.op for e in log if e.node == node]
        assert sorted(kinds, key=lambda op: op != "delpolicy") == kinds and kinds.count("delsa") == 2, kinds
    assert a.kernel.sas == {} and b.kernel.sas == {} and a.kernel.policies == {} and b.kernel.policies == {}
    # the pair comes back through the trap: on either side, a new record and a new handshake
    again, _ = await up(a, b, A1, B1)
    assert again is not ta and again.current is not None and again.current.number == 1


async def test_a_peer_whose_counters_moved_keeps_the_pair_on_both_sides(nodes: dict[str, Node]) -> None:
    """node-b's pod sent right after node-a read its counters (the race one-sided reclaim loses): node-b answers
    KEEP, nothing goes anywhere, and node-a does not ask again for another idle timeout."""
    a, b = nodes["a"], nodes["b"]
    ta, tb = await up(a, b, A1, B1)
    await idle(a, b)
    assert tb.current is not None
    b.kernel.bytes[tb.current.spi_out] = 1500  # node-b's out SA carried a packet since node-b's last check
    assert await a.od.reclaim_idle() == []
    assert b.served == [("pod", B1, A1)]
    assert removals(a.kernel.log) == [] and ta.current is not None and tb.current is not None
    a.clock.now += a.od.reclaim_interval()
    assert await a.od.reclaim_idle() == [] and len(b.served) == 1  # kept: not asked again yet
    a.clock.now += IDLE
    b.clock.now += IDLE + a.od.reclaim_interval()
    assert await b.od.reclaim_idle() == []  # node-b reads the moved counter now: active from here
    assert await a.od.reclaim_idle() == [] and len(b.served) == 2  # asked again: its bytes are too recent
    assert removals(a.kernel.log) == [] and (a.reclaims(), b.reclaims()) == (0, 0)


async def test_a_peer_running_a_handshake_or_on_another_generation_keeps_the_pair(nodes: dict[str, Node]) -> None:
    a, b = nodes["a"], nodes["b"]
    ta, tb = await up(a, b, A1, B1)
    await idle(a, b)
    async with tb.lock:  # node-b is answering a handshake for the pair
        assert await a.od.reclaim_idle() == []
    assert ta.current is not None and tb.current is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
    stale = hs.Preamble(hs.Kind.TEARDOWN_REQUEST, KeyScope.POD, A1, B1, spis=(0x1234, 0x5678))
    reply = await hs.request_teardown(reader, writer, stale)
    writer.close()
    assert reply.status is hs.Teardown.KEEP and "generation is another one" in reply.reason, reply
    assert removals(a.kernel.log) == []


async def test_both_sides_reclaiming_at_once_end_in_one_teardown(nodes: dict[str, Node]) -> None:
    """Each asks the other at the same moment: the initiator's request goes first, the responder's gets KEEP and
    its handler then answers the initiator's."""
    a, b = nodes["a"], nodes["b"]
    ta, _ = await up(a, b, A1, B1)
    await idle(a, b)
    gone_a, gone_b = await asyncio.gather(a.od.reclaim_idle(), b.od.reclaim_idle())
    await eventually(b.reasons, 5, "node-b's side of the pair to go")  # the record comes when it is gone
    assert (gone_a, gone_b) == ([ta], [])
    assert a.reasons() == ["idle: reclaimed with the peer"] and b.reasons() == ["idle: reclaimed by the peer"]
    assert a.kernel.sas == {} and b.kernel.sas == {} and (a.reclaims(), b.reclaims()) == (1, 1)


async def test_traffic_meeting_the_peers_trap_during_the_teardown_waits_for_the_next_generation(
    nodes: dict[str, Node],
) -> None:
    """node-b's pod sent while node-b was between stopping and removing (its ACQUIRE waits on the pair's record):
    the generation still goes, the record stays for the pair's next handshake, which node-b asks for at once (it
    responds: it asks node-a)."""
    a, b = nodes["a"], nodes["b"]
    ta, tb = await up(a, b, A1, B1)
    await idle(a, b)
    b.od.in_flight.add(("pod", B1, A1))
    trap = b.manager.sa.pair_trap(ip_address(B1), ip_address(A1))
    b.kernel.refill = trap  # the ACQUIRE's pair trap takes the out policy's slot as soon as it is free
    try:
        assert await a.od.reclaim_idle() == [ta]
        await eventually(b.reasons, 5, "node-b's side of the pair to go")
    finally:
        b.od.in_flight.discard(("pod", B1, A1))
    assert b.reasons() == ["idle: reclaimed by the peer"] and (a.reclaims(), b.reclaims()) == (1, 1)
    assert b.manager.tunnels[("pod", B1, A1)] is tb and not tb.removed
    assert tb.current is None and tb.rekey_wanted and tb.seen_bytes == (-1, -1)
    # its generation went; the pair trap holding the packets stayed (only the in/fwd policies went after it)
    assert b.kernel.sas == {} and list(b.kernel.policies.values()) == [trap] and a.kernel.sas == {}
    assert ("pod", B1, A1) not in b.od.reclaimed  # it is on its way back
    await b.manager.initiator.nudge(tb)  # what node-b's scheduler does for it
    fresh = a.manager.tunnels[("pod", A1, B1)]
    await a.manager.initiator.initiate(fresh)
    assert fresh.current is not None and tb.current is not None and tb.current.number == 2
    assert (tb.current.spi_in, tb.current.spi_out) == (fresh.current.spi_out, fresh.current.spi_in)


@pytest.mark.parametrize("old_bridge", ["closes", "refuses"])
async def test_a_peer_that_predates_teardown_requests_leaves_this_side_to_reclaim_alone(
    nodes: dict[str, Node], old_bridge: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bridge that predates the request closes the connection on the unknown kind (or, a newer one, refuses the
    preamble): node-a reclaims its side alone, as it did before, and says so once per peer."""
    a, b = nodes["a"], nodes["b"]
    _, tb = await up(a, b, A1, B1)
    tb2, _ = await up(b, a, B2, A1)  # the second pair with node-b: node-b initiates it

    async def old(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)  # magic, kind 3, scope, length: "malformed preamble" to it
        if old_bridge == "refuses":
            writer.write(hs.status_refused("protocol: malformed preamble"))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(old, "127.0.0.1", 0)
    a.netns.port = server.sockets[0].getsockname()[1]
    try:
        await idle(a, b)
        with caplog.at_level(logging.INFO, logger="ipsec_bridge.tunnels.ondemand"):
            gone = await a.od.reclaim_idle()
    finally:
        server.close()
        await server.wait_closed()
    assert sorted(t.spec.key for t in gone) == [("pod", A1, B1), ("pod", A1, B2)]
    assert a.reasons() == ["idle: this side only (the peer's bridge took no part)"] * 2
    told = [r.getMessage() for r in caplog.records if "takes no part" in r.getMessage()]
    assert len(told) == 1 and "192.168.50.2" in told[0], told
    assert b.served == [] and tb.current is not None and tb2.current is not None  # node-b decides for itself


async def test_an_unreachable_peer_leaves_this_side_to_reclaim_alone(nodes: dict[str, Node]) -> None:
    a, b = nodes["a"], nodes["b"]
    ta, _ = await up(a, b, A1, B1)
    await idle(a, b)
    closed = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    a.netns.port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    assert await a.od.reclaim_idle() == [ta]
    assert a.reasons() == ["idle: this side only (the peer's bridge took no part)"]


async def test_a_peer_that_sets_up_eagerly_or_is_asked_from_elsewhere_keeps_the_pair(nodes: dict[str, Node]) -> None:
    """Only the pair's peer node may tear it down (the same source check as a handshake's), and an eager bridge
    keeps its tunnels while policy admits them."""
    a, b = nodes["a"], nodes["b"]
    ta, tb = await up(a, b, A1, B1)
    await idle(a, b)
    responder = b.manager.responder
    responder.settings = dataclasses.replace(responder.settings, check_source_address=True)
    assert await a.od.reclaim_idle() == []  # node-a's bridge is 192.168.50.1 in WDS, this came from 127.0.0.1
    assert b.served == [] and tb.current is not None and ta.current is not None
    responder.settings = dataclasses.replace(responder.settings, check_source_address=False)
    handler, responder.on_teardown = responder.on_teardown, None  # what an eager bridge has
    a.clock.now += IDLE
    assert await a.od.reclaim_idle() == []
    assert removals(a.kernel.log) == []
    responder.on_teardown = handler
    a.clock.now += IDLE
    assert await a.od.reclaim_idle() == [ta]  # both agree at last


async def test_a_teardown_request_for_a_pair_the_peer_does_not_have_is_answered_absent(
    nodes: dict[str, Node],
) -> None:
    b = nodes["b"]
    reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
    ask = hs.Preamble(hs.Kind.TEARDOWN_REQUEST, KeyScope.POD, A1, B1, spis=(0x1234, 0x5678))
    reply = await hs.request_teardown(reader, writer, ask)
    writer.close()
    assert reply == hs.TeardownReply(hs.Teardown.ABSENT, f"no tunnel {B1} <-> {A1} on this node")
    # a request that names no generation is refused as a preamble (status 1: what an old bridge would see too)
    reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
    raw = hs.Preamble(hs.Kind.TEARDOWN_REQUEST, KeyScope.POD, A1, B1)
    reply = await hs.request_teardown(reader, writer, raw)
    writer.close()
    assert reply.status is None and "must name the generation" in reply.reason


async def test_a_rekey_request_from_another_address_than_the_peer_nodes_is_refused(nodes: dict[str, Node]) -> None:
    """As a handshake's: node-b initiates b2 <-> a1, only node-a's bridge (192.168.50.1) may ask it to rekey."""
    a, b = nodes["a"], nodes["b"]
    await up(b, a, B2, A1)
    responder = b.manager.responder
    responder.settings = dataclasses.replace(responder.settings, check_source_address=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
    with pytest.raises(hs.HandshakeError, match=r"connection from 127\.0\.0\.1, but node node-a's bridge is at"):
        await hs.request_rekey(reader, writer, hs.Preamble(hs.Kind.REKEY_REQUEST, KeyScope.POD, A1, B2))
    writer.close()
    assert not b.manager.tunnels[("pod", B2, A1)].rekey_wanted


async def test_teardown_preambles_round_trip_and_name_their_generation() -> None:
    ask = hs.Preamble(hs.Kind.TEARDOWN_REQUEST, KeyScope.POD, A1, B1, spis=(0x1001, 0xFFFF_FFFF))
    assert b'"spi_in":4097,"spi_out":4294967295' in ask.encode()
    reader = asyncio.StreamReader()
    reader.feed_data(ask.encode())
    assert await hs.read_preamble(reader) == ask
    reader = asyncio.StreamReader()
    reader.feed_data(dataclasses.replace(ask, spis=None).encode().replace(b"}", b',"spi_in":0}'))
    with pytest.raises(hs.HandshakeError, match="malformed preamble"):
        await hs.read_preamble(reader)  # SPI 0 names no SA
    assert hs.teardown_answer(hs.Teardown.KEEP, "busy") == b"\x02\x00\x04busy"
