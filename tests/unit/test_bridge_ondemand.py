"""--setup on-demand without a kernel: the trap and deny policies byte by byte, ACQUIREs as the kernel sends them
(Linux 6.1, seen in tests/kernel/test_bridge_ondemand_kernel.py), what the bridge does with each, idle reclaim
on an injected clock, and the options' errors. The kernel's side of the story is in that kernel test."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, cast

import pytest

from ipsec_bridge.main import BridgeConfig
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.sa_manager import BRIDGE_MARK, TRAP_PRIORITY, TRAP_REQID, SaManager, SaSettings
from ipsec_bridge.tunnels.ondemand import OnDemand, acquired_pair
from ipsec_bridge.tunnels.records import Generation, Tunnel
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings
from ipsec_bridge.tunnels.table import TunnelTable
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import XfrmMsg
from ipsec_bridge.xfrm.offload import OffloadStatus
from tests.support.bridge_fakes import MESH, RecordingXfrm
from tests.support.bridge_mesh import load_view, write_mesh
from tests.support.xfrm_samples import CURLFT_ZERO, LFT_DEFAULT, Z4, Z12, hx
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
    assert kinds == [XfrmMsg.UPDPOLICY, XfrmMsg.ALLOCSPI]  # the block, then the larval state gets an SPI
    block = m.decode_policy(xfrm.requests[0].payload).policy
    assert (block.action, block.priority, block.lifetime.hard_add_seconds) == (1, 100, 30)
    assert od.stats == {"received": 1, "denied": 1} and od.table.tunnels == {}
    assert od.dump()["denied_pairs"] == ["10.1.0.11->10.2.0.10"]
    # policy admits the pair later: its block goes at once
    xfrm.requests.clear()
    await od.forgive([(A2, B1)])
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
    # no handshake ran (no scheduler here): nothing installed, the larval states kept (the kernel asks later)
    assert xfrm.requests == []
    assert od.stats == {"received": 4, "duplicate": 1, "over_cap": 1, "failed": 2}
    assert "zt_bridge_acquires_total" in registry.render() and od.in_flight == set()


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
    assert kinds == [XfrmMsg.UPDPOLICY, XfrmMsg.ALLOCSPI]  # the trap re-written (held packets go), the larval
    assert m.decode_policy(xfrm.requests[0].payload).policy.priority == TRAP_PRIORITY
    assert od.stats["admitted"] == 1


async def settle_until_record(od: OnDemand) -> None:
    for _ in range(100):
        if od.table.tunnels:
            return
        await od.table.wake.changed()


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
