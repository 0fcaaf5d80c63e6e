"""--setup on-demand without a kernel: the trap and deny policies byte by byte, ACQUIREs as the kernel sends them
(Linux 6.1, seen in tests/kernel/test_bridge_ondemand_kernel.py), what the bridge does with each, idle reclaim
on an injected clock, and the options' errors. The kernel's side of the story is in that kernel test."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import logging
import re
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, cast

import pytest

from ipsec_bridge import pairs
from ipsec_bridge.local_source import LocalConfigSource
from ipsec_bridge.main import BridgeConfig
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.sa_manager import (
    BRIDGE_MARK,
    FLOW_HOLD_PRIORITY,
    LARVAL_SPI_MAX,
    LARVAL_SPI_MIN,
    PAIR_TRAP_PRIORITY,
    RELEASED_HOLD_PRIORITY,
    SPI_MIN,
    TRAP_PRIORITY,
    TRAP_REQID,
    Endpoints,
    GenerationInstaller,
    InboundRefused,
    SaManager,
    SaSettings,
    host_net,
)
from ipsec_bridge.state import StateStore
from ipsec_bridge.tunnels.manager import TunnelManager
from ipsec_bridge.tunnels.ondemand import OnDemand, acquired_pair, pod_key
from ipsec_bridge.tunnels.records import Generation, Tunnel
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings
from ipsec_bridge.tunnels.table import TunnelTable
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import Mode, XfrmMsg
from ipsec_bridge.xfrm.netlink import XfrmError
from ipsec_bridge.xfrm.offload import OffloadStatus
from tests.support.bridge_fakes import MESH, NoCertificates, RecordingXfrm
from tests.support.bridge_mesh import DENY_FRONTEND_LEDGER, load_view, write_mesh
from tests.support.xfrm_samples import CURLFT_ZERO, LFT_DEFAULT, Z4, Z12, hx
from ztcore.mesh.translate import TranslateOptions
from ztcore.metrics import Registry

A1, A2, B1, B2 = (ip_address(x) for x in ("10.1.0.10", "10.1.0.11", "10.2.0.10", "10.2.0.11"))
NODE_A, NODE_B = ip_address("192.168.50.1"), ip_address("192.168.50.2")
MARK_ATTR = "0c00 1500 00000000 000f0000"  # XFRMA_MARK 0/0xf00: BRIDGE_MARK
TRAP_TMPL = f"{Z4} {Z12} 00000000 32 000000 0000 0000 {Z4} {Z12} ffffff5a 00 00 00 00 ffffffff ffffffff ffffffff"


def sa_manager(on_demand: bool = True) -> tuple[SaManager, RecordingXfrm]:
    xfrm = RecordingXfrm([], [])
    return SaManager(cast(Any, xfrm), SaSettings(mesh_cidrs=MESH, on_demand=on_demand)), xfrm


# --- the policies, byte by byte ------------------------------------------------------------------------------


def test_a_pods_trap_policy_on_the_wire() -> None:
    sa, _ = sa_manager()
    (trap,) = sa.trap_policies(A1)
    assert hx(f"""
      0a000000 {Z12} 0a01000a {Z12} 0000 0000 0000 0000   # sel daddr 10.0.0.0, saddr 10.1.0.10, no ports
      0200 08 20 00 000000 {Z4} {Z4}                       #     AF_INET /8 /32, any proto
      {LFT_DEFAULT} {CURLFT_ZERO} f4010000 00000000 01 00 00 00 00000000   # prio 500, dir out, allow
      4400 0500 {TRAP_TMPL}                                # one template: ESP transport, no addresses, TRAP_REQID
      {MARK_ATTR}
    """) == m.encode_policy(trap)
    assert TRAP_REQID == 0x5AFFFFFF and trap.priority == TRAP_PRIORITY


def test_a_denied_pairs_block_expires_in_the_kernel() -> None:
    sa, _ = sa_manager()
    block = sa.deny_policy(A2, B1)
    lifetime = "ffffffffffffffff" * 4 + "0000000000000000 1e00000000000000 0000000000000000 0000000000000000"
    assert hx(f"""
      0a02000a {Z12} 0a01000b {Z12} 0000 0000 0000 0000 0200 20 20 00 000000 {Z4} {Z4}
      {lifetime} {CURLFT_ZERO} 64000000 00000000 01 01 00 00 00000000   # prio 100, out, BLOCK
      {MARK_ATTR}
    """) == m.encode_policy(block)


async def test_traps_come_and_go_with_the_local_pods_only_on_demand() -> None:
    for on_demand, per_pod in ((True, 3), (False, 2)):
        sa, xfrm = sa_manager(on_demand)
        await sa.set_local_pods([A1, A2])
        added = [m.decode_policy(r.payload).policy for r in xfrm.requests]
        assert len(added) == 2 * per_pod
        traps = [p for p in added if p.priority == TRAP_PRIORITY]
        assert [p.selector.src for p in traps] == ([IPv4Network("10.1.0.10/32"), IPv4Network("10.1.0.11/32")]
                                                   if on_demand else [])  # fmt: skip
        xfrm.requests.clear()
        await sa.set_local_pods([A1])
        assert [r.type for r in xfrm.requests] == [XfrmMsg.DELPOLICY] * per_pod


# --- ACQUIREs as the kernel sends them -------------------------------------------------------------------------


def acquire_bytes(src: str, dst: str, proto: int, sport: int, dport: int, *, prio: int = TRAP_PRIORITY,
                  mark: str = MARK_ATTR, seq: int = 7) -> bytes:  # fmt: skip
    """xfrm_user_acquire for an IPv4 trap hit: the larval id (pod addresses, spi 0), the packet's selector."""

    def a4(ip: str) -> str:
        return ip_address(ip).packed.hex()

    ports = f"{dport:04x} {'ffff' if dport or proto else '0000'} {sport:04x} {'ffff' if sport or proto else '0000'}"
    return hx(f"""
      {a4(dst)} {Z12} 00000000 32 000000                # id: daddr = the peer pod, spi 0, ESP
      {a4(src)} {Z12}                                   # saddr = the local pod
      {a4(dst)} {Z12} {a4(src)} {Z12} {ports}           # the packet's selector
      0200 20 20 {proto:02x} 000000 {Z4} {Z4}
      {a4("10.0.0.0")} {Z12} {a4(src)} {Z12} 0000 0000 0000 0000 0200 08 20 00 000000 {Z4} {Z4}   # the trap
      {LFT_DEFAULT} {CURLFT_ZERO} {prio.to_bytes(4, "little").hex()} 21000000 01 00 00 00 00000000
      ffffffff ffffffff ffffffff {seq.to_bytes(4, "little").hex()}
      4400 0500 {TRAP_TMPL.replace("0000 0000", "0200 0000", 1)}
      {mark}
    """)


@pytest.mark.parametrize(
    ("raw", "pair", "proto", "ports"),
    [
        (acquire_bytes("10.1.0.10", "10.2.0.10", 1, 8, 0), (A1, B1), 1, (8, 0)),  # ping: sport = ICMP type 8
        (acquire_bytes("10.1.0.10", "10.2.0.11", 6, 40312, 8080), (A1, B2), 6, (40312, 8080)),  # a TCP SYN
        (acquire_bytes("10.1.0.11", "10.2.0.10", 17, 5353, 53), (A2, B1), 17, (5353, 53)),
        (acquire_bytes("10.1.0.10", "10.2.0.10", 1, 8, 0, prio=100), None, 1, (8, 0)),  # not our trap
        # a pair's own trap asks again once its larval state expired (its handshake kept failing)
        (acquire_bytes("10.1.0.10", "10.2.0.10", 1, 8, 0, prio=PAIR_TRAP_PRIORITY), (A1, B1), 1, (8, 0)),
        (acquire_bytes("10.1.0.10", "10.2.0.10", 1, 8, 0, mark="0c00 1500 01000000 ffffffff"), None, 1, (8, 0)),
    ],
)
def test_acquires_decode_to_the_pod_pair(raw: bytes, pair: Any, proto: int, ports: tuple[int, int]) -> None:
    event = m.decode_event(m.NetlinkMessage(XfrmMsg.ACQUIRE, 0, 0, 0, raw))
    assert isinstance(event, m.Acquire)
    assert (event.src, event.dst, event.spi, event.seq) == (ip_address(str(event.selector.src.network_address)),
                                                           event.selector.dst.network_address, 0, 7)  # fmt: skip
    assert (event.selector.proto, event.selector.sport, event.selector.dport) == (proto, *ports)
    assert event.templates[0].mode == 0 and event.templates[0].reqid == TRAP_REQID
    assert acquired_pair(event) == pair


def test_an_ipv6_acquire_decodes_to_the_pod_pair() -> None:
    local, peer = ip_address("fd00:1::a"), ip_address("fd00:2::a")
    tmpl = TRAP_TMPL.replace("0000 0000", "0a00 0000", 1)
    raw = hx(f"""
      {peer.packed.hex()} 00000000 32 000000 {local.packed.hex()}
      {peer.packed.hex()} {local.packed.hex()} 0000 ffff 0080 ffff 0a00 80 80 3a 000000 {Z4} {Z4}
      {"00" * 16} {local.packed.hex()} 0000 0000 0000 0000 0a00 00 80 00 000000 {Z4} {Z4}
      {LFT_DEFAULT} {CURLFT_ZERO} f4010000 21000000 01 00 00 00 00000000 ffffffff ffffffff ffffffff 09000000
      4400 0500 {tmpl} {MARK_ATTR}
    """)
    event = m.decode_acquire(raw)
    assert event.selector.src == IPv6Network("fd00:1::a/128") and event.selector.proto == 58
    assert acquired_pair(event) == (local, peer) and (event.dst, event.seq) == (peer, 9)


# --- what the bridge does with them ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def on_demand(tmp_path: Path, **overrides: Any) -> tuple[OnDemand, RecordingXfrm, Clock, Registry]:
    store = await load_view(write_mesh(tmp_path))
    sa, xfrm = sa_manager()
    registry, clock = Registry(), Clock()
    metrics = BridgeMetrics(registry)
    settings = BridgeSettings(node="node-a", node_address=NODE_A, on_demand=True, handshake_timeout=0.05,
                              **overrides)  # fmt: skip
    table = TunnelTable(sa, metrics, clock)
    return OnDemand(settings, store, table, sa, metrics, monotonic=clock), xfrm, clock, registry


def event_for(src: str, dst: str, seq: int = 7) -> m.Acquire:
    return m.decode_acquire(acquire_bytes(src, dst, 1, 8, 0, seq=seq))


async def settle(od: OnDemand) -> None:
    for task in list(od.handlers):
        await task


async def test_a_denied_pair_gets_a_block_and_its_larval_state_released(tmp_path: Path) -> None:
    od, xfrm, _, _ = await on_demand(tmp_path)
    od.on_acquire(event_for("10.1.0.11", "10.2.0.10"))  # a2 -> b1: payments/deny-debug
    await settle(od)
    kinds = [r.type for r in xfrm.requests]
    # the block, then the larval state gets the SPI its DELSA names, in one batch
    assert kinds == [XfrmMsg.UPDPOLICY, XfrmMsg.ALLOCSPI, XfrmMsg.DELSA]
    block = m.decode_policy(xfrm.requests[0].payload).policy
    assert (block.action, block.priority, block.lifetime.hard_add_seconds) == (1, 100, 30)
    assert od.stats == {"received": 1, "denied": 1} and od.table.tunnels == {}
    assert od.dump()["denied_pairs"] == ["10.1.0.11->10.2.0.10"]
    # a state change that still denies it keeps the block (only the blocked pair is asked about again)
    xfrm.requests.clear()
    await od.forgive(od.store.view)
    assert xfrm.requests == [] and set(od.denied) == {(A2, B1)}
    # policy admits the pair later: its block goes at once
    od.store = await load_view(write_mesh(tmp_path / "later", policies=""))
    await od.forgive(od.store.view)
    assert [r.type for r in xfrm.requests] == [XfrmMsg.DELPOLICY] and od.denied == {}


async def test_an_admitted_pair_gets_its_record_once_and_storms_are_bounded(tmp_path: Path) -> None:
    od, xfrm, _, registry = await on_demand(tmp_path, max_acquires=2)
    od.on_acquire(event_for("10.1.0.10", "10.2.0.10"))  # a1 -> b1: node-a initiates
    od.on_acquire(event_for("10.1.0.10", "10.2.0.10", seq=8))  # the same pair again: already in flight
    od.on_acquire(event_for("10.1.0.10", "10.2.0.11"))  # a1 -> b2: node-b initiates, node-a will nudge
    od.on_acquire(event_for("10.1.0.11", "10.2.0.11"))  # over the cap of 2
    assert set(od.table.tunnels) == set() and len(od.in_flight) == 2
    await settle(od)
    t1, t2 = od.table.tunnels[("pod", str(A1), str(B1))], od.table.tunnels[("pod", str(A1), str(B2))]
    assert t1.spec.initiator and not t1.rekey_wanted and t1.origin == "acquire"
    assert not t2.spec.initiator and t2.rekey_wanted  # asks node-b now, not after responder_nudge_after
    # no handshake ran (no scheduler here): no SA, the larval states kept (the kernel asks later); each pair got
    # its own trap in its out policy's slot, and the head of a1's queue (a1->b1, the first ACQUIRE) a hold on
    # its flow, which became a BLOCK when that pair failed: the queue behind it is freed, not left stuck
    written = [(r.type, m.decode_policy(r.payload).policy) for r in xfrm.requests]
    assert sorted((t.name, p.priority, p.action.name, str(p.selector.dst), p.selector.proto) for t, p in written) == [
        ("NEWPOLICY", PAIR_TRAP_PRIORITY, "ALLOW", f"{B1}/32", 0),
        ("NEWPOLICY", PAIR_TRAP_PRIORITY, "ALLOW", f"{B2}/32", 0),
        ("UPDPOLICY", FLOW_HOLD_PRIORITY, "ALLOW", f"{B1}/32", 1),  # ping: ICMP echo request, type 8 code 0
        ("UPDPOLICY", FLOW_HOLD_PRIORITY, "BLOCK", f"{B1}/32", 1),
    ]
    assert written[-1][1].action.name == "BLOCK" and written[-1][1].lifetime.hard_add_seconds == 2
    assert od.stats == {"received": 4, "duplicate": 1, "over_cap": 1, "failed": 2} and od.queues == {}
    assert "zt_bridge_acquires_total" in registry.render() and od.in_flight == set()


async def test_a_larval_state_is_released_in_one_round_trip_under_an_spi_of_its_own() -> None:
    """ALLOCSPI names the one SPI it may give (min = max, from the larval range), so the DELSA of that SPI goes in
    the same batch; each release names another SPI, none in the range the bridge's SAs use."""
    sa, xfrm = sa_manager()
    events = [event_for("10.1.0.10", "10.2.0.10", seq=7), event_for("10.1.0.11", "10.2.0.10", seq=8)]
    for event in events:
        await sa.release_acquire(event)
    assert [r.type for r in xfrm.requests] == [XfrmMsg.ALLOCSPI, XfrmMsg.DELSA] * 2
    spis = []
    for event, alloc, delete in zip(events, xfrm.requests[::2], xfrm.requests[1::2], strict=True):
        larval = m.decode_sa_id(delete.payload)
        assert (larval.dst, larval.mark) == (event.dst, BRIDGE_MARK)
        request = m.SpiRequest(event.src, event.dst, larval.spi, larval.spi, reqid=TRAP_REQID, mode=Mode.TRANSPORT,
                               seq=event.seq, mark=BRIDGE_MARK)  # fmt: skip
        assert alloc.payload == m.alloc_spi(request).payload
        spis.append(larval.spi)
    assert spis[0] != spis[1] and all(LARVAL_SPI_MIN <= spi <= LARVAL_SPI_MAX < SPI_MIN for spi in spis)


async def test_an_acquire_whose_tunnel_comes_up_releases_and_kicks(tmp_path: Path) -> None:
    od, xfrm, clock, _ = await on_demand(tmp_path)
    await od.sa.set_local_pods([A1])
    xfrm.requests.clear()
    od.on_acquire(event_for("10.1.0.10", "10.2.0.10"))
    await settle_until_record(od)
    t = od.table.tunnels[("pod", str(A1), str(B1))]
    t.current = generation(clock.now)
    od.table.wake.set()  # what Generations.commit does
    await settle(od)
    kinds = [r.type for r in xfrm.requests]
    # the pair's trap and its flow's hold; once up, the hold below the pair's policy and the pod's trap
    # re-written in one batch (the held packets go), then the larval state released
    assert kinds == [XfrmMsg.NEWPOLICY, XfrmMsg.UPDPOLICY, XfrmMsg.UPDPOLICY, XfrmMsg.UPDPOLICY, XfrmMsg.ALLOCSPI,
                     XfrmMsg.DELSA]  # fmt: skip
    priorities = [m.decode_policy(r.payload).policy.priority for r in xfrm.requests[:4]]
    assert priorities == [PAIR_TRAP_PRIORITY, FLOW_HOLD_PRIORITY, RELEASED_HOLD_PRIORITY, TRAP_PRIORITY]
    assert od.stats["admitted"] == 1 and od.queues == {}


async def settle_until_record(od: OnDemand) -> None:
    for _ in range(100):
        if od.table.tunnels:
            return
        await od.table.wake.changed()


def tcp_event(src: str, dst: str, sport: int, dport: int, seq: int = 9) -> m.Acquire:
    return m.decode_acquire(acquire_bytes(src, dst, 6, sport, dport, seq=seq))


async def until(check: Callable[[], bool]) -> None:
    """Until the handlers (tasks of this loop) have made `check` true; they run between our yields."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("the handlers never got there")


def up(od: OnDemand, local: Any, peer: Any, now: float) -> None:
    od.table.tunnels[("pod", str(local), str(peer))].current = generation(now)
    od.table.wake.set()  # what Generations.commit does


def written(xfrm: RecordingXfrm) -> list[tuple[str, int, str]]:
    """(message, priority, selector dst) of each policy written."""
    out = []
    for r in xfrm.requests:
        if r.type in (XfrmMsg.NEWPOLICY, XfrmMsg.UPDPOLICY):
            p = m.decode_policy(r.payload).policy
            out.append((r.type.name, p.priority, str(p.selector.dst)))
    return out


async def test_a_pods_held_first_packets_wait_until_its_last_new_pair_is_up(tmp_path: Path) -> None:
    # a1's first packets to b1 and b2 wait in one kernel queue (a1's trap), which leaves all at once when its
    # oldest packet's pair (b1) has an SA: a packet of b2 would be freed if b2 had none yet
    od, xfrm, clock, _ = await on_demand(tmp_path)
    od.hold_max = 60.0
    await od.sa.set_local_pods([A1])
    xfrm.requests.clear()
    od.on_acquire(event_for("10.1.0.10", "10.2.0.10"))
    od.on_acquire(tcp_event("10.1.0.10", "10.2.0.11", 40312, 8080))
    await until(lambda: len(od.table.tunnels) == 2)
    up(od, A1, B1, clock.now)
    await until(lambda: pod_key((A1, B1)) not in od.in_flight)  # b1's handler is done, the queue waits for b2
    # (the holds ride with the next netlink batch: none was needed yet)
    assert xfrm.requests == [] and od.queues[A1].pending == {(A1, B2)}
    up(od, A1, B2, clock.now)
    await settle(od)
    flow = f"{B1}/32"
    assert written(xfrm) == [
        ("NEWPOLICY", PAIR_TRAP_PRIORITY, f"{B1}/32"),  # each pair's own trap, in its out policy's slot
        ("UPDPOLICY", FLOW_HOLD_PRIORITY, flow),  # the head's flow
        ("NEWPOLICY", PAIR_TRAP_PRIORITY, f"{B2}/32"),
        ("UPDPOLICY", RELEASED_HOLD_PRIORITY, flow),  # both up: the hold steps aside, the queue runs at once
        ("UPDPOLICY", TRAP_PRIORITY, "10.0.0.0/8"),
    ]
    hold = m.decode_policy(xfrm.requests[1].payload).policy
    assert (hold.selector.proto, hold.selector.sport, hold.selector.dport) == (1, 8, 0)  # the ping's flow only
    assert [r.type for r in xfrm.requests].count(XfrmMsg.ALLOCSPI) == 2  # both larval states released
    assert od.stats["admitted"] == 2 and od.queues == {}
    assert od.held == {"all_up": 1}  # no first packet freed


async def test_the_last_pair_of_a_held_queue_lets_it_go_in_its_own_switch_batch(tmp_path: Path) -> None:
    od, xfrm, clock, _ = await on_demand(tmp_path)
    od.hold_max = 60.0
    await od.sa.set_local_pods([A1])
    ep = {peer: Endpoints(NODE_A, NODE_B, host_net(A1), host_net(peer)) for peer in (B1, B2)}
    sel = {peer: (host_net(A1), host_net(peer)) for peer in (B1, B2)}
    # the head (b1) switches while b2, behind it in a1's queue, is still being set up: its batch is its own
    od.on_acquire(event_for("10.1.0.10", "10.2.0.10"))
    od.on_acquire(tcp_event("10.1.0.10", "10.2.0.11", 40312, 8080))
    await until(lambda: len(od.table.tunnels) == 2)
    xfrm.requests.clear()
    await od.sa.switch_policies(ep[B1], [sel[B1]], 0x5A000001, in_place=[sel[B1]])
    assert [p for _, p, _ in written(xfrm)] == [PAIR_TRAP_PRIORITY, FLOW_HOLD_PRIORITY, PAIR_TRAP_PRIORITY, 100]
    up(od, A1, B1, clock.now)
    up(od, A1, B2, clock.now)
    await settle(od)  # released by the head's handler once b2 is up
    assert [p for _, p, _ in written(xfrm)][4:] == [RELEASED_HOLD_PRIORITY, TRAP_PRIORITY]
    # a queue of one pair: its out policy, the hold stepping aside and a1's trap in one batch; no kick after
    od, xfrm, clock, _ = await on_demand(tmp_path / "one")
    await od.sa.set_local_pods([A1])
    od.on_acquire(tcp_event("10.1.0.10", "10.2.0.10", 40400, 8080))
    await until(lambda: A1 in od.queues and od.queues[A1].held)  # its handler asked for the hold
    xfrm.requests.clear()
    await od.sa.switch_policies(ep[B1], [sel[B1]], 0x5A000002, in_place=[sel[B1]])
    up(od, A1, B1, clock.now)
    in_batch = [p for _, p, _ in written(xfrm)]
    assert in_batch == [PAIR_TRAP_PRIORITY, FLOW_HOLD_PRIORITY, 100, RELEASED_HOLD_PRIORITY, TRAP_PRIORITY]
    await settle(od)
    assert [p for _, p, _ in written(xfrm)] == in_batch and od.queues == {}
    assert od.held == {"all_up": 1}


class UnreadAcquires:
    """The bridge's ACQUIRE socket, holding events the kernel has sent and `watch` has not read yet."""

    def __init__(self) -> None:
        self.unread: list[m.Acquire] = []
        self.closed = asyncio.Event()

    def __aiter__(self) -> UnreadAcquires:
        return self

    async def __anext__(self) -> m.Acquire:
        await self.closed.wait()
        raise StopAsyncIteration

    def ready_now(self) -> list[m.Acquire]:
        out, self.unread = self.unread, []
        return out


async def test_a_queue_is_not_let_go_before_the_acquires_already_sent_are_read(tmp_path: Path) -> None:
    # b2's first packet joined a1's queue just before b1 (the head) switches; its ACQUIRE is in the socket, unread.
    # Letting the queue go in b1's batch would free that packet (TCP resends it after 1 s): the switch reads the
    # ACQUIREs first, and the queue waits for b2
    od, xfrm, clock, _ = await on_demand(tmp_path)
    od.hold_max = 60.0
    await od.sa.set_local_pods([A1])
    events = UnreadAcquires()
    watcher = asyncio.create_task(od.watch(events))  # type: ignore[arg-type]
    ep = {peer: Endpoints(NODE_A, NODE_B, host_net(A1), host_net(peer)) for peer in (B1, B2)}
    sel = {peer: (host_net(A1), host_net(peer)) for peer in (B1, B2)}
    od.on_acquire(tcp_event("10.1.0.10", "10.2.0.10", 40400, 8080))
    await until(lambda: A1 in od.queues and od.queues[A1].held)
    events.unread.append(tcp_event("10.1.0.10", "10.2.0.11", 40402, 8080, seq=10))
    xfrm.requests.clear()
    await od.sa.switch_policies(ep[B1], [sel[B1]], 0x5A000003, in_place=[sel[B1]])
    # b1's trap and hold, b2's trap (its handler ran before the batch left), b1's out policy; no release yet
    assert [p for _, p, _ in written(xfrm)] == [PAIR_TRAP_PRIORITY, FLOW_HOLD_PRIORITY, PAIR_TRAP_PRIORITY, 100]
    assert od.queues[A1].pending == {(A1, B1), (A1, B2)} and od.stats["received"] == 2
    up(od, A1, B1, clock.now)
    await until(lambda: len(od.table.tunnels) == 2)
    up(od, A1, B2, clock.now)
    await settle(od)
    assert [p for _, p, _ in written(xfrm)][4:] == [RELEASED_HOLD_PRIORITY, TRAP_PRIORITY]
    assert od.queues == {} and od.stats["admitted"] == 2
    events.closed.set()
    await watcher


async def test_a_pods_queue_waits_for_a_slow_pair_no_longer_than_hold_max(tmp_path: Path) -> None:
    od, xfrm, clock, registry = await on_demand(tmp_path)  # handshake_timeout 0.05: b2 gives up after 0.1 s
    od.hold_max = 0.02
    await od.sa.set_local_pods([A1])
    kicked: list[bool] = []
    kick = od.sa.kick

    async def recording_kick(ip: Any, flow: Any = None, *, up: bool = True) -> None:
        kicked.append(pod_key((A1, B2)) in od.in_flight)
        await kick(ip, flow, up=up)

    od.sa.kick = recording_kick  # type: ignore[method-assign]
    xfrm.requests.clear()
    od.on_acquire(event_for("10.1.0.10", "10.2.0.10"))
    od.on_acquire(tcp_event("10.1.0.10", "10.2.0.11", 40312, 8080))
    await until(lambda: len(od.table.tunnels) == 2)
    up(od, A1, B1, clock.now)
    await settle(od)
    # the head's queue went while b2 was still being set up (its first packet is lost: TCP sends it again, into
    # b2's own trap); b2 giving up later writes nothing more
    assert kicked == [True]
    assert [p for _, p, _ in written(xfrm)].count(TRAP_PRIORITY) == 1
    assert od.stats["admitted"] == 1 and od.stats["failed"] == 1
    assert od.held == {"hold_max": 1, "pairs_given_up": 1}  # counted where an operator sees it
    assert od.metrics.held_pairs_given_up.value() == 1 and od.metrics.held_queues.value(outcome="hold_max") == 1
    assert 'zt_bridge_held_queues_total{outcome="hold_max"} 1' in registry.render()


async def test_a_slow_head_still_waits_for_the_pairs_set_up_beside_it(tmp_path: Path) -> None:
    # under load the head took 0.6 of hold_max's 1 s; b2, asked for with it, comes up just after: the queue waits
    # for b2 (whose first packet would otherwise be freed, and sent again only after TCP's 1 s RTO)
    od, xfrm, clock, _ = await on_demand(tmp_path)
    await od.sa.set_local_pods([A1])
    od.on_acquire(event_for("10.1.0.10", "10.2.0.10"))
    od.on_acquire(tcp_event("10.1.0.10", "10.2.0.11", 40312, 8080))
    od.queues[A1].opened -= 0.6
    await until(lambda: len(od.table.tunnels) == 2)
    up(od, A1, B1, clock.now)
    await until(lambda: pod_key((A1, B1)) not in od.in_flight)
    assert od.queues[A1].pending == {(A1, B2)}  # b1 is up; its handler waits
    xfrm.requests.clear()
    up(od, A1, B2, clock.now)
    await settle(od)
    assert [p for _, p, _ in written(xfrm)][-2:] == [RELEASED_HOLD_PRIORITY, TRAP_PRIORITY]
    assert od.stats["admitted"] == 2 and od.queues == {} and od.held == {"all_up": 1}


async def test_a_denied_head_frees_its_pods_queue_at_once(tmp_path: Path) -> None:
    od, xfrm, _, _ = await on_demand(tmp_path)
    await od.sa.set_local_pods([A2])
    xfrm.requests.clear()
    od.on_acquire(event_for("10.1.0.11", "10.2.0.10"))  # a2 -> b1: denied, and the oldest packet of a2's queue
    od.on_acquire(tcp_event("10.1.0.11", "10.2.0.11", 40312, 8080))  # a2 -> b2 behind it
    await settle(od)
    # the pair's BLOCK, then a2's trap re-written: the kernel frees the queue now (its head meets the BLOCK), not
    # at its next tick; no flow hold was made for a pair that is refused
    policies = written(xfrm)
    assert policies.index(("UPDPOLICY", 100, f"{B1}/32")) < policies.index(("UPDPOLICY", TRAP_PRIORITY, "10.0.0.0/8"))
    assert FLOW_HOLD_PRIORITY not in [p for _, p, _ in policies] and od.queues == {}
    assert od.held == {"head_failed": 1, "pairs_given_up": 1}  # b2's packet went with the queue


async def test_a_pairs_trap_never_replaces_what_is_already_in_its_slot(caplog: pytest.LogCaptureFixture) -> None:
    class TakenSlot(RecordingXfrm):
        def __init__(self, err: int) -> None:
            super().__init__([], [])
            self.err = err

        async def call_each(self, requests: Sequence[m.Request]) -> list[Any]:
            self.requests.extend(requests)
            return [XfrmError(requests[0].what, self.err), *([] for _ in requests[1:])]

    flow = m.Selector(ip_network(f"{A1}/32"), ip_network(f"{B1}/32"), 6, 40312, 0xFFFF, 8080, 0xFFFF)
    for err, logged in ((errno.EEXIST, False), (errno.ENOBUFS, True)):
        xfrm = TakenSlot(err)
        sa = SaManager(cast(Any, xfrm), SaSettings(mesh_cidrs=MESH, on_demand=True))
        sa.hold(A1, B1, flow, 30)
        with caplog.at_level(logging.WARNING, logger="ipsec_bridge.sa_manager"):
            caplog.clear()
            await sa.kick(A1, flow)  # the next batch carries the holds first
        # NEWPOLICY: never a replace; EEXIST (the pair is up or blocked already) is what it is for
        assert [r.type for r in xfrm.requests] == [XfrmMsg.NEWPOLICY, XfrmMsg.UPDPOLICY, XfrmMsg.UPDPOLICY]
        assert bool(caplog.records) is logged
    hold = m.decode_policy(xfrm.requests[1].payload).policy
    assert hold.selector == flow and hold.lifetime.hard_add_seconds == 30 and hold.templates[0].reqid == TRAP_REQID
    assert m.decode_policy(xfrm.requests[2].payload).policy.priority == RELEASED_HOLD_PRIORITY


async def test_a_new_on_demand_pairs_policies_go_in_with_its_sas() -> None:
    ep, sel = Endpoints(NODE_A, NODE_B, host_net(A1), host_net(B1)), (host_net(A1), host_net(B1))
    key = m.Aead(bytes(16), b"salt")

    def steps(xfrm: RecordingXfrm, since: int) -> list[tuple[str, str]]:
        out = []
        for r in xfrm.requests[since:]:
            what = m.decode_policy(r.payload).policy.direction.name if "POLICY" in r.type.name else "sa"
            out.append((r.type.name, what))
        return out

    for on_demand in (True, False):
        sa, xfrm = sa_manager(on_demand)
        # the initiator: inbound SA, then (after the peer's done) outbound SA, then the generation's switch
        gen = GenerationInstaller(sa, ep, (sel,), 0x5A000009, None, defer_policies=True, spi_in=0x1234)
        seen = []
        for step in (gen.install((0x1234, key), None), gen.install(None, (0x5678, key)), gen.switch([sel])):
            mark = len(xfrm.requests)
            await step
            seen.append(steps(xfrm, mark))
        if on_demand:  # in/fwd with the inbound SA, the out policy with the outbound SA, nothing left to switch
            assert seen == [[("UPDSA", "sa"), ("UPDPOLICY", "IN"), ("UPDPOLICY", "FWD")],
                            [("NEWSA", "sa"), ("UPDPOLICY", "OUT")], []]  # fmt: skip
        else:  # eager: the policies after the exchange, under their own deadline
            assert seen == [[("UPDSA", "sa")], [("NEWSA", "sa")],
                            [("UPDPOLICY", "IN"), ("UPDPOLICY", "FWD"), ("UPDPOLICY", "OUT")]]  # fmt: skip
        assert gen.switched
    # the responder installs both SAs at once: one batch, each policy once
    sa, xfrm = sa_manager(True)
    gen = GenerationInstaller(sa, ep, (sel,), 0x5A00000A, None, defer_policies=True, spi_in=0x1234)
    await gen.install((0x1234, key), (0x5678, key))
    await gen.switch([sel])
    assert steps(xfrm, 0) == [("UPDSA", "sa"), ("UPDPOLICY", "IN"), ("UPDPOLICY", "FWD"), ("NEWSA", "sa"),
                              ("UPDPOLICY", "OUT")]  # fmt: skip


async def test_a_proposed_spi_is_reserved_by_its_newsa_and_one_the_kernel_refuses_is_never_removed() -> None:
    """Revision 2: an inbound SPI chosen by the bridge goes in with NEWSA, which the kernel refuses if a live SA has
    it (UPDSA would change that SA). A refused one belongs to that live SA: the rollback must leave it, and still
    remove what else the batch put in."""

    class LiveSpi(RecordingXfrm):
        async def call_each(self, requests: Sequence[m.Request]) -> list[Any]:
            self.requests.extend(requests)
            return [XfrmError("NEWSA", errno.EEXIST) if r.type == XfrmMsg.NEWSA else [] for r in requests]

    ep, sel = Endpoints(NODE_A, NODE_B, host_net(A1), host_net(B1)), (host_net(A1), host_net(B1))
    key = m.Aead(bytes(16), b"salt")
    sa, xfrm = sa_manager(True)
    gen = GenerationInstaller(sa, ep, (sel,), 0x5A00000B, None, defer_policies=True)
    spi = gen.propose_spi()
    assert SPI_MIN <= spi <= 0xFFFF_FFFF and xfrm.requests == []  # chosen here: nothing reached the kernel
    await gen.install((spi, key), None)
    assert [r.type for r in xfrm.requests][:1] == [XfrmMsg.NEWSA]  # never UPDSA: there is no larval state
    await gen.rollback()
    assert xfrm.deleted_spis() == {spi}  # it went in: the rollback removes it

    xfrm = LiveSpi([], [])
    sa = SaManager(cast(Any, xfrm), SaSettings(mesh_cidrs=MESH, on_demand=True))
    gen = GenerationInstaller(sa, ep, (sel,), 0x5A00000C, None, defer_policies=True)
    spi = gen.propose_spi()
    with pytest.raises(InboundRefused, match="NEWSA failed"):
        await gen.install((spi, key), None)
    await gen.rollback()
    assert spi not in xfrm.deleted_spis()  # the live SA that has it stays
    removed = sorted(r.what.rsplit(" ", 1)[1] for r in xfrm.requests if r.type == XfrmMsg.DELPOLICY)
    assert removed == ["fwd", "in", "out"]  # what else the batch put in (the pair's in/fwd policies) goes


def generation(now: float) -> Generation:
    wall = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    return Generation(1, 0x5A000001, 0xA001, 0xB001, 16, OffloadStatus.NONE, wall, now, wall, 0.01)


def counters(spi_in_bytes: int, spi_out_bytes: int) -> list[m.SaInfo]:
    def sa(src: Any, dst: Any, spi: int, nbytes: int) -> m.SaInfo:
        sel = m.Selector(ip_network(f"{A1}/32"), ip_network(f"{B1}/32"))
        return m.SaInfo(m.SecurityAssociation(src, dst, spi, None, sel, mark=BRIDGE_MARK), m.LifetimeCurrent(nbytes))

    return [sa(NODE_B, NODE_A, 0xA001, spi_in_bytes), sa(NODE_A, NODE_B, 0xB001, spi_out_bytes)]


async def test_an_idle_tunnel_is_reclaimed_policies_first_and_a_busy_one_stays(tmp_path: Path) -> None:
    od, xfrm, clock, registry = await on_demand(tmp_path, idle_timeout=60)
    spec = od.activate(("pod", str(A1), str(B1)))
    assert spec is not None
    t: Tunnel = spec
    t.current = generation(clock.now)
    readings: Sequence[tuple[float, int, int, int]] = [
        (10, 100, 100, 1), (30, 100, 200, 1), (89, 100, 200, 1),  # bytes at 30 s: active from there
        (91, 100, 200, 0),  # 61 s without a byte: gone
    ]  # fmt: skip
    for at, nbytes_in, nbytes_out, left in readings:
        clock.now = 1000 + at
        xfrm.sas = counters(nbytes_in, nbytes_out)
        await od.reclaim_idle()
        assert len(od.table.tunnels) == left, at
    kinds = [r.type for r in xfrm.requests]
    assert kinds == [XfrmMsg.DELPOLICY] * 3 + [XfrmMsg.DELSA] * 2  # out, in, fwd; then both SAs
    assert xfrm.requests[0].payload[m.SELECTOR_LEN + 4] == 1  # xfrm_userpolicy_id.dir: the out policy first
    assert od.dump()["reclaimed_pairs"] == [f"{A1}->{B1}"]
    assert "zt_bridge_reclaims_total 1" in registry.render()
    # it talks again: the ACQUIRE's record takes it out of the reclaimed list
    od.activate(("pod", str(A1), str(B1)))
    assert od.dump()["reclaimed_pairs"] == []


async def test_a_latency_critical_tunnel_is_never_reclaimed(tmp_path: Path) -> None:
    od, xfrm, clock, _ = await on_demand(tmp_path, idle_timeout=60, eager_for=("payments/ledger",))
    pinned, other = od.activate(("pod", str(A1), str(B1))), od.activate(("pod", str(A1), str(B2)))
    assert pinned is not None and other is not None
    pinned.current, other.current = generation(clock.now), generation(clock.now)
    xfrm.sas = counters(100, 100)
    for at in (10, 200):  # a1<->b2 idle for 190 s: gone; a1<->b1 (b1 runs as payments/ledger) stays
        clock.now = 1000 + at
        await od.reclaim_idle()
    assert set(od.table.tunnels) == {("pod", str(A1), str(B1))}


async def test_on_demand_reconcile_asks_only_about_the_pairs_that_talked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 30 local x 30 remote pods, all admitted (no policy): 900 pairs, of which two talked and one was blocked
    pods = {f"a{i}": ("shop", "frontend", "frontend", "node-a", f"10.1.0.{10 + i}") for i in range(30)}
    pods |= {f"b{i}": ("payments", "ledger", "ledger", "node-b", f"10.2.0.{10 + i}") for i in range(30)}
    store = await load_view(write_mesh(tmp_path / "v1", policies="", pods=pods))
    sa, xfrm = sa_manager()
    settings = BridgeSettings(node="node-a", node_address=NODE_A, on_demand=True, handshake_timeout=0.05)
    manager = TunnelManager(settings, store, sa, cast(Any, NoCertificates()), cast(Any, None),
                            BridgeMetrics(Registry()))  # fmt: skip
    assert manager.on_demand is not None
    await manager.reconcile(store.view)  # the traps of the 30 local pods, no record
    assert manager.tunnels == {} and manager.refused == ()
    for peer in (B1, B2):
        manager.on_demand.on_acquire(event_for("10.1.0.10", str(peer)))
    await settle(manager.on_demand)  # no handshake here: the records stay, the ACQUIREs count as failed
    assert len(manager.tunnels) == 2
    manager.on_demand.denied[(A2, B1)] = 1e9  # a block from an earlier state

    asked: list[tuple[Any, Any]] = []
    real = pairs.evaluate_pair

    def counting(view: Any, local: Any, remote: Any) -> Any:
        asked.append((local.ip, remote.ip))
        return real(view, local, remote)

    monkeypatch.setattr(pairs, "evaluate_pair", counting)
    # a change that revokes a1<->b2 (b2 gone): the new records and the blocked pair are asked about, not 900
    del pods["b1"]  # 10.2.0.11: B2
    await reload(store, write_mesh(tmp_path / "v2", policies="", pods=pods))
    xfrm.requests.clear()
    await manager.reconcile(store.view)
    assert sorted(asked, key=str) == sorted([(A1, B1), (A2, B1)], key=str)  # b2 is not a mesh pod any more
    assert set(manager.tunnels) == {("pod", str(A1), str(B1))}  # a1<->b2's record went (it had no SA yet)
    assert manager.on_demand.denied == {}  # its block went at once
    assert XfrmMsg.DELPOLICY in [r.type for r in xfrm.requests]
    # a change to pods a1<->b1 does not rest on (a new remote pod): nothing is asked
    asked.clear()
    pods["b99"] = ("payments", "ledger", "ledger", "node-b", "10.2.1.99")
    await reload(store, write_mesh(tmp_path / "v3", policies="", pods=pods))
    await manager.reconcile(store.view)
    assert asked == [] and set(manager.tunnels) == {("pod", str(A1), str(B1))}
    # a policy change: every record is asked again (here: denied, so it goes)
    await reload(store, write_mesh(tmp_path / "v4", policies=DENY_FRONTEND_LEDGER, pods=pods))
    await manager.reconcile(store.view)
    assert asked == [(A1, B1)] and manager.tunnels == {}


async def reload(store: StateStore, folder: Path) -> None:
    """The folder source's next read, into the same store (so the view's rules_version moves as in a bridge)."""
    await LocalConfigSource(folder, store, TranslateOptions()).load_initial()


def test_on_demand_options_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="--setup on-demand needs --tunnel-scope pod"):
        BridgeSettings(node="n", scope=TunnelScope.NODE, on_demand=True)
    with pytest.raises(ValueError, match="idle timeout must be >= 0"):
        BridgeSettings(node="n", on_demand=True, idle_timeout=-1)
    base = {"node": "n", "config_dir": Path("."), "token_file": Path("t"), "mesh_cidr": ("10.0.0.0/8",)}
    with pytest.raises(ValueError, match="--setup on-demand needs --tunnel-scope pod"):
        BridgeConfig(**base, setup="on-demand", tunnel_scope="node")  # type: ignore[arg-type]
    cfg = BridgeConfig(**base, setup="on-demand")  # type: ignore[arg-type]
    assert cfg.settings().on_demand and cfg.settings().idle_timeout == 600
    with pytest.raises(ValueError, match="--eager-for needs --setup on-demand"):
        BridgeConfig(**base, eager_for=("payments/ledger",))  # type: ignore[arg-type]
    for bad in ("payments", "payments/", "*/ledger", "payments/led*", "a/b/c"):
        with pytest.raises(ValueError, match=re.escape(f"--eager-for {bad!r}: give NAMESPACE/SERVICEACCOUNT")):
            BridgeConfig(**base, setup="on-demand", eager_for=(bad,))  # type: ignore[arg-type]
    marked = BridgeConfig(**base, setup="on-demand", eager_for=("payments/*", "shop/cart"))  # type: ignore[arg-type]
    assert marked.settings().eager_for == ("payments/*", "shop/cart")


@pytest.mark.parametrize(
    ("eager_for", "records"),
    [
        ((), set()),
        (("payments/ledger",), {(A1, B1)}),  # b1's pairs that policy admits: a2 -> b1 is denied (deny-debug)
        (("payments/*", "shop/cart"), {(A1, B1), (A1, B2), (A2, B2)}),  # every admitted pair has b1 or b2
        (("shop/frontend",), {(A1, B1), (A1, B2)}),  # a local pod marked: all its admitted pairs
    ],
)
async def test_latency_critical_pairs_get_their_tunnel_at_once_on_demand(
    tmp_path: Path, eager_for: tuple[str, ...], records: set[tuple[Any, Any]]
) -> None:
    store = await load_view(write_mesh(tmp_path))
    sa, _ = sa_manager()
    settings = BridgeSettings(node="node-a", node_address=NODE_A, on_demand=True, eager_for=eager_for)
    manager = TunnelManager(settings, store, sa, cast(Any, NoCertificates()), cast(Any, None),
                            BridgeMetrics(Registry()))  # fmt: skip
    await manager.reconcile(store.view)
    assert {(ip_address(k[1]), ip_address(k[2])) for k in manager.tunnels} == records
    assert all(t.origin == "eager" for t in manager.tunnels.values())
