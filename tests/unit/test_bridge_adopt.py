"""What a restarting bridge may adopt: `ipsec_bridge.adopt.plan_adoption` on dumps built from the very objects
`SaManager` installs (its pure builders), changed one way at a time."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any, cast

import pytest

from ipsec_bridge.adopt import AdoptionPlan, Layout, plan_adoption
from ipsec_bridge.handshake import HandshakeError, Kind, Preamble
from ipsec_bridge.keys import KeyScope
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.sa_manager import (
    BRIDGE_MARK,
    REQID_BASE,
    TRAP_PRIORITY,
    TRAP_REQID,
    Endpoints,
    SaManager,
    SaSettings,
    host_net,
)
from ipsec_bridge.tunnels.manager import TunnelManager
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import Mode, PolicyAction, PolicyDir, XfrmMsg
from tests.support.bridge_fakes import MESH, NoCertificates, RecordingXfrm, block_policy_dump
from tests.support.bridge_mesh import load_view, write_mesh
from ztcore.metrics import Registry
from ztctl.commands.tunnels import rows as tunnels_rows

NODE_A, NODE_B, NODE_C = ip_address("192.168.50.1"), ip_address("192.168.50.2"), ip_address("192.168.50.3")
A1, A2, B1, B2 = (ip_address(x) for x in ("10.1.0.10", "10.1.0.11", "10.2.0.10", "10.2.0.11"))
ANY = ip_network("0.0.0.0/0")
AEAD = m.Aead(bytes(range(1, 17)), b"salt")
MGR = SaManager(cast(Any, None), SaSettings(mesh_cidrs=MESH))  # only its pure builders are used
R1, R2, R3 = REQID_BASE | 1, REQID_BASE | 2, REQID_BASE | 7

Dump = tuple[list[m.SaInfo], list[m.PolicyInfo]]


def layout(scope: TunnelScope = TunnelScope.POD, node_address: Any = None) -> Layout:
    return MGR.layout(scope, node_address)


def pod_ep(local: Any = A1, peer: Any = B1, local_node: Any = NODE_A, peer_node: Any = NODE_B) -> Endpoints:
    return Endpoints(local_node, peer_node, host_net(local), host_net(peer))


def node_ep(local_node: Any = NODE_A, peer_node: Any = NODE_B) -> Endpoints:
    return Endpoints(local_node, peer_node, ANY, ANY)


def sas(
    ep: Endpoints, reqid: int, spi_in: int, spi_out: int, *, inbound: bool = True, outbound: bool = True
) -> list[m.SaInfo]:
    out = []
    if inbound:
        out.append(m.SaInfo(MGR.inbound_sa(ep, spi_in, AEAD, reqid), m.LifetimeCurrent(packets=5, add_time=1000)))
    if outbound:
        out.append(m.SaInfo(MGR.outbound_sa(ep, spi_out, AEAD, reqid), m.LifetimeCurrent(packets=7, add_time=1000)))
    return out


def pair_policies(ep: Endpoints, sel: tuple[Any, Any], reqid: int, *, dirs: str = "out,in,fwd") -> list[m.PolicyInfo]:
    pols = [MGR.out_policy(ep, sel, reqid), *MGR.in_policies(ep, sel)]
    return [m.PolicyInfo(p) for p in pols if p.direction.name.lower() in dirs.split(",")]


def pod_tunnel(local: Any = A1, peer: Any = B1, reqid: int = R1, spi_in: int = 0x1111, spi_out: int = 0x2222) -> Dump:
    ep = pod_ep(local, peer)
    return sas(ep, reqid, spi_in, spi_out), pair_policies(ep, (ep.local_net, ep.peer_net), reqid)


def plan(*dumps: Dump, extra_sas: list[m.SaInfo] | None = None, extra_pols: list[m.PolicyInfo] | None = None,
         lay: Layout | None = None) -> AdoptionPlan:  # fmt: skip
    all_sas = [s for d in dumps for s in d[0]] + (extra_sas or [])
    all_pols = block_policy_dump() + [p for d in dumps for p in d[1]] + (extra_pols or [])
    return plan_adoption(all_sas, all_pols, lay or layout())


def reasons(p: AdoptionPlan) -> list[tuple[str, str]]:
    return [(r.what, r.reason) for r in (*p.remove_policies, *p.remove_sas)]


# --- the happy paths ---------------------------------------------------------------------------------------------


def test_a_complete_pod_tunnel_is_adopted_untouched() -> None:
    p = plan(pod_tunnel(), pod_tunnel(A2, B2, R2, 0x3333, 0x4444))
    assert reasons(p) == [] and p.missing_block == ()
    assert len(p.tunnels) == 2
    t = next(t for t in p.tunnels if t.local_net == host_net(A1))
    assert (t.local_node, t.peer_node, t.peer_net) == (NODE_A, NODE_B, host_net(B1))
    assert t.selectors == ((host_net(A1), host_net(B1)),)
    assert (t.current.reqid, t.current.spi_in, t.current.spi_out, t.current.key_bytes) == (R1, 0x1111, 0x2222, 16)
    assert (t.current.added, t.current.packets_in, t.current.packets_out) == (1000, 5, 7)
    assert p.highest_reqid == 2 and p.local_node == NODE_A
    assert p.held_spis() == {(NODE_A, 0x1111), (NODE_B, 0x2222), (NODE_A, 0x3333), (NODE_B, 0x4444)}


def test_a_crash_inside_the_grace_period_adopts_both_generations_the_newer_current() -> None:
    ep = pod_ep()
    dump = (
        sas(ep, R1, 0x1111, 0x2222) + sas(ep, R3, 0x5555, 0x6666),
        pair_policies(ep, (ep.local_net, ep.peer_net), R3),
    )
    p = plan(dump)
    assert reasons(p) == []
    (t,) = p.tunnels
    assert t.current.reqid == R3 and [g.reqid for g in t.older] == [R1]
    assert p.highest_reqid == 7
    assert (NODE_A, 0x1111) in p.held_spis() and (NODE_B, 0x6666) in p.held_spis()


def test_node_scope_one_tunnel_carries_every_complete_pod_pair() -> None:
    ep = node_ep()
    dump = (
        sas(ep, R1, 0x1111, 0x2222),
        pair_policies(ep, (host_net(A1), host_net(B1)), R1) + pair_policies(ep, (host_net(A2), host_net(B2)), R1),
    )
    p = plan(dump, lay=layout(TunnelScope.NODE))
    assert reasons(p) == []
    (t,) = p.tunnels
    assert (t.scope, t.local_net, t.peer_net) == (TunnelScope.NODE, ANY, ANY)
    assert sorted(t.selectors, key=str) == sorted([(host_net(A1), host_net(B1)), (host_net(A2), host_net(B2))], key=str)


def test_complete_bypass_sets_are_adopted_and_objects_of_others_are_left_alone() -> None:
    bypass = [m.PolicyInfo(p) for p in MGR._bypass_policies(A1)]
    foreign_pol = m.PolicyInfo(m.Policy(m.Selector.of("10.0.0.0/8", "10.9.0.0/16"), PolicyDir.OUT, priority=5))
    foreign_sa = dataclasses.replace(sas(pod_ep(), 0x77, 0x9999, 0x8888)[0].sa, mark=None)
    p = plan(pod_tunnel(), extra_pols=[*bypass, foreign_pol], extra_sas=[m.SaInfo(foreign_sa)])
    assert p.bypass == (A1,) and reasons(p) == [] and len(p.tunnels) == 1


OD = SaManager(cast(Any, None), SaSettings(mesh_cidrs=MESH, on_demand=True))  # on-demand's pure builders


def test_on_demand_traps_stay_with_their_pods_and_the_holds_of_acquires_go() -> None:
    bypass = [m.PolicyInfo(p) for ip in (A1, A2) for p in OD._bypass_policies(ip)]  # bypass pair + trap each
    half = [i for i in bypass if not (i.policy.selector.dst == host_net(A2) and i.policy.direction == PolicyDir.OUT)]
    flow = m.Selector(host_net(A1), host_net(B2), 6, 40312, 0xFFFF, 8080, 0xFFFF)
    holds = [m.PolicyInfo(p) for p in (OD.pair_trap(A1, B2), OD.flow_hold(flow, 30), OD.released_hold(flow, True))]
    # the larval state of an ACQUIRE in flight: the trap's reqid, the top of the bridge's range
    larval = m.SaInfo(m.SecurityAssociation(A1, B2, 0, None, flow, reqid=TRAP_REQID, mode=Mode.TRANSPORT,
                                            mark=BRIDGE_MARK))  # fmt: skip
    p = plan(pod_tunnel(), extra_pols=half + holds, extra_sas=[larval], lay=OD.layout(TunnelScope.POD))
    assert p.bypass == (A1,) and len(p.tunnels) == 1 and p.highest_reqid == 1  # not 0xffffff: R1's
    hold = "an on-demand hold of the previous run (its ACQUIRE is gone)"
    assert sorted(reasons(p)) == sorted([
        ("policy", f"incomplete bypass set for pod {A2}"),
        ("policy", f"trap of pod {A2}, whose bypass set is not complete"),
        *[("policy", hold)] * 3,
        ("sa", "larval state (an SPI reserved by ALLOCSPI, never keyed)"),
    ])  # fmt: skip
    # a bridge that sets tunnels up eagerly keeps no trap
    p = plan(pod_tunnel(), extra_pols=bypass, lay=layout())
    assert p.bypass == (A1, A2)
    assert reasons(p) == [("policy", "not a policy this bridge installs")] * 2


async def test_an_on_demand_restart_rewrites_the_adopted_pods_traps_in_place() -> None:
    bypass = [m.PolicyInfo(p) for p in OD._bypass_policies(A1) if p.priority != TRAP_PRIORITY]  # its trap lost
    xfrm = RecordingXfrm([], block_policy_dump() + bypass)
    sa = SaManager(cast(Any, xfrm), SaSettings(mesh_cidrs=MESH, on_demand=True))
    p = await sa.start(TunnelScope.POD)
    assert p.bypass == (A1,) and sa._bypass == {A1}
    assert [(r.type, m.decode_policy(r.payload).policy) for r in xfrm.requests] == [
        (XfrmMsg.UPDPOLICY, trap) for trap in sa.trap_policies(A1)
    ]


# --- what cannot be proven goes ---------------------------------------------------------------------------------

Build = Callable[[], AdoptionPlan]
CASES: list[tuple[str, Build, list[tuple[str, str]]]] = []


def case(name: str, expected: list[tuple[str, str]]) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        CASES.append((name, build, expected))
        return build

    return register


HALF = "half of generation 0x5a000007 (an unfinished or rolled-back handshake)"


@case("a lone inbound SA of another generation (handshake cut short)", [("sa", HALF)])
def _half() -> AdoptionPlan:
    return plan(pod_tunnel(), extra_sas=sas(pod_ep(), R3, 0x5555, 0, outbound=False))


@case("a larval ALLOCSPI state", [("sa", "larval state (an SPI reserved by ALLOCSPI, never keyed)")])
def _larval() -> AdoptionPlan:
    larval = dataclasses.replace(sas(pod_ep(), R3, 0x5555, 0, outbound=False)[0].sa, aead=None)
    return plan(pod_tunnel(), extra_sas=[m.SaInfo(larval)])


@case("an SA with our mark but a reqid we never allocate", [("sa", "reqid 0x00000042 is not one the bridge allocates")])
def _reqid() -> AdoptionPlan:
    odd = dataclasses.replace(sas(pod_ep(), R1, 0x5555, 0)[0].sa, reqid=0x42)
    return plan(pod_tunnel(), extra_sas=[m.SaInfo(odd)])


@case("an SA with our reqid range but not our mark", [("sa", "reqid in the bridge's range without the bridge's mark")])
def _mark() -> AdoptionPlan:
    odd = dataclasses.replace(sas(pod_ep(), R3, 0x5555, 0)[0].sa, mark=m.Mark(1, 0xFF))
    return plan(pod_tunnel(), extra_sas=[m.SaInfo(odd)])


NO_SAS = "generation 0x5a000001 its out policy uses has 0 outbound and 0 inbound SA(s), not one of each"


@case(
    "an SPI below the bridge's range",
    [("sa", "SPI 0x00000200 is below the bridge's range")] * 2 + [("policy", NO_SAS)] * 3,
)
def _spi() -> AdoptionPlan:
    return plan(pod_tunnel(spi_in=0x200, spi_out=0x200))


@case(
    "the current generation lacks its outbound SA",
    [("policy", "generation 0x5a000001 its out policy uses has 0 outbound and 1 inbound SA(s), not one of each")] * 3
    + [("sa", "generation 0x5a000001 its out policy uses has 0 outbound and 1 inbound SA(s), not one of each")],
)
def _no_outbound() -> AdoptionPlan:
    ep = pod_ep()
    return plan((sas(ep, R1, 0x1111, 0x2222, outbound=False), pair_policies(ep, (ep.local_net, ep.peer_net), R1)))


@case(
    "the pair's fwd policy is missing",
    [("policy", "its pair has no matching in/fwd policies"), ("policy", "no out policy of ours for its pair")]
    + [("sa", "no complete policy set of ours refers to it")] * 2,
)
def _no_fwd() -> AdoptionPlan:
    ep = pod_ep()
    return plan((sas(ep, R1, 0x1111, 0x2222), pair_policies(ep, (ep.local_net, ep.peer_net), R1, dirs="out,in")))


@case("SAs no policy refers to", [("sa", "no complete policy set of ours refers to it")] * 2)
def _orphans() -> AdoptionPlan:
    return plan(pod_tunnel(), extra_sas=sas(pod_ep(A2, B2), R2, 0x3333, 0x4444))


@case("a selector outside the mesh", [("sa", "pod scope, but the selector is not a mesh pod pair")])
def _outside() -> AdoptionPlan:
    odd = dataclasses.replace(
        sas(pod_ep(), R2, 0x5555, 0)[0].sa, selector=m.Selector.of("172.16.0.1/32", "10.1.0.10/32")
    )
    return plan(pod_tunnel(), extra_sas=[m.SaInfo(odd)])


@case(
    "pod-scope objects under a node-scope configuration",
    [("sa", "node scope, but the selector is not any -> any")] * 2 + [("policy", NO_SAS)] * 3,
)
def _scope() -> AdoptionPlan:
    # the policies alone still form a node-scope candidate, which then has no SAs
    return plan(pod_tunnel(), lay=layout(TunnelScope.NODE))


@case(
    "tunnels from another local address than --node-address",
    [("policy", "local end 192.168.50.1 is not this node's address 192.168.50.3")]
    + [("policy", "no out policy of ours for its pair")] * 2
    + [("sa", "no complete policy set of ours refers to it")] * 2,
)
def _node_address() -> AdoptionPlan:
    return plan(pod_tunnel(), lay=layout(node_address=NODE_C))


@case(
    "node scope: the out policies of one node pair point at two generations",
    [("policy", "out policies towards 192.168.50.2 point at 2 generations")] * 2
    + [("policy", "no out policy of ours for its pair")] * 4
    + [("sa", "no complete policy set of ours refers to it")] * 2,
)
def _two_gens() -> AdoptionPlan:
    ep = node_ep()
    pols = pair_policies(ep, (host_net(A1), host_net(B1)), R1) + pair_policies(ep, (host_net(A2), host_net(B2)), R2)
    return plan((sas(ep, R1, 0x1111, 0x2222), pols), lay=layout(TunnelScope.NODE))


@case("an incomplete bypass set", [("policy", "incomplete bypass set for pod 10.1.0.11")])
def _bypass() -> AdoptionPlan:
    half = [m.PolicyInfo(p) for p in MGR._bypass_policies(A2) if p.direction == PolicyDir.OUT]
    return plan(pod_tunnel(), extra_pols=half)


@case("a policy of a shape the bridge never installs", [("policy", "not a policy this bridge installs")])
def _shape() -> AdoptionPlan:
    odd = m.Policy(
        m.Selector.of("10.1.0.10/32", "10.2.0.10/32"),
        PolicyDir.OUT,
        priority=150,
        mark=MGR.layout(TunnelScope.POD).mark,
    )
    return plan(pod_tunnel(), extra_pols=[m.PolicyInfo(odd)])


@pytest.mark.parametrize(("name", "build", "expected"), CASES, ids=[c[0] for c in CASES])
def test_what_cannot_be_proven_is_removed_with_a_reason(
    name: str, build: Build, expected: list[tuple[str, str]]
) -> None:
    p = build()
    assert sorted(reasons(p)) == sorted(expected), name
    assert p.missing_block == ()


def test_the_tunnels_that_can_be_proven_survive_their_neighbours_flaws() -> None:
    p = _half()
    (t,) = p.tunnels
    assert t.current.reqid == R1 and t.older == ()
    assert _orphans().tunnels[0].local_net == host_net(A1)


def test_out_policies_are_removed_before_in_and_fwd() -> None:
    p = _no_fwd()
    assert [r.target.direction for r in p.remove_policies if isinstance(r.target, m.PolicyId)] == [
        PolicyDir.OUT, PolicyDir.IN,
    ]  # fmt: skip
    p = _no_outbound()
    assert next(r.target.direction for r in p.remove_policies if isinstance(r.target, m.PolicyId)) == PolicyDir.OUT


def test_several_local_addresses_without_node_address_prove_nothing() -> None:
    other = pod_ep(A2, B2, local_node=NODE_C)
    dump = (sas(other, R2, 0x3333, 0x4444), pair_policies(other, (other.local_net, other.peer_net), R2))
    p = plan(pod_tunnel(), dump)
    assert p.tunnels == ()
    assert ("policy", "out policies name several local nodes (192.168.50.1, 192.168.50.3)") in reasons(p)
    assert len(p.remove_sas) == 4


def test_missing_or_altered_block_policies_are_reinstalled_never_removed() -> None:
    blocks = MGR.block_policies()
    altered = dataclasses.replace(blocks[0], action=PolicyAction.ALLOW)  # same id as a block policy
    sas_, pols = pod_tunnel()
    p = plan_adoption(sas_, [m.PolicyInfo(altered), *pols], layout())
    assert p.missing_block == tuple(blocks)
    assert all(r.target != blocks[0].id() for r in p.remove_policies)
    assert len(p.tunnels) == 1


def test_key_material_never_reaches_a_description() -> None:
    p = _orphans()
    text = " ".join(r.description + r.reason for r in (*p.remove_policies, *p.remove_sas))
    text += " ".join(repr(t) + t.describe() for t in p.tunnels)
    assert AEAD.key.hex() not in text and "salt" not in text


# --- the tunnel manager's side: adopted tunnels wait for the state, then are kept (and rekeyed) or removed --------


async def test_adopted_tunnels_wait_for_the_state_then_are_kept_or_removed(tmp_path: Path) -> None:
    store = await load_view(write_mesh(tmp_path))  # node-a admits {a1,b1} (initiator) and {a1,b2}; not {a2,b1}
    dumps = [pod_tunnel(A1, B1, R1, 0x1111, 0x2222), pod_tunnel(A1, B2, R2, 0x3333, 0x4444),
             pod_tunnel(A2, B1, R3, 0x5555, 0x6666)]  # fmt: skip
    xfrm = RecordingXfrm([s for d in dumps for s in d[0]], block_policy_dump() + [p for d in dumps for p in d[1]])
    sa = SaManager(cast(Any, xfrm), SaSettings(mesh_cidrs=MESH))
    p = await sa.start(TunnelScope.POD)
    assert len(p.tunnels) == 3 and xfrm.requests == []  # the block was there, nothing else to do
    registry = Registry()
    manager = TunnelManager(BridgeSettings(node="node-a"), store, sa, cast(Any, NoCertificates()), cast(Any, None),
                            BridgeMetrics(registry))  # fmt: skip
    manager.adopt(p)

    # before the state is synced: nothing is touched, the dump shows the three as adopted, handshakes wait
    before = await manager.dump()
    assert sorted((r["key"], r["state"], r["spi_in"]) for r in before["tunnels"]) == [
        (f"adopted/{A1}/{B1}", "adopted", "0x00001111"),
        (f"adopted/{A1}/{B2}", "adopted", "0x00003333"),
        (f"adopted/{A2}/{B1}", "adopted", "0x00005555"),
    ]
    assert manager.counts()["adopted"] == 3 and xfrm.requests == []
    with pytest.raises(HandshakeError, match="no workload state yet"):
        manager.responder.tunnel_for(Preamble(Kind.HANDSHAKE, KeyScope.POD, str(B2), str(A1)))

    await manager.reconcile(store.view)
    # the refused pair's policies and SAs went; the admitted ones became tunnels whose keys are the adopted ones
    assert xfrm.deleted_spis() == {0x5555, 0x6666}
    initiated, responded = manager.tunnels[("pod", str(A1), str(B1))], manager.tunnels[("pod", str(A1), str(B2))]
    assert initiated.spec.initiator and not responded.spec.initiator
    for t, spis in ((initiated, (0x1111, 0x2222)), (responded, (0x3333, 0x4444))):
        assert t.current is not None and (t.current.spi_in, t.current.spi_out) == spis
        assert t.current.origin == "adopted" and t.rekey_wanted and t.rekey_reason == "replacing adopted keys"
    assert {r["key"]: r["state"] for r in (await manager.dump())["tunnels"]} == {
        f"pod/{A1}/{B1}": "adopted",
        f"pod/{A1}/{B2}": "adopted",
        f"pod/{A2}/{B2}": "pending",  # admitted but not in the kernel: a new tunnel as usual
    }
    assert list(manager.removals) == [{"tunnel": f"adopted/{A2}/{B1}", "reason": "not admitted after restart",
                                       "seconds": manager.removals[0]["seconds"]}]  # fmt: skip
    text = registry.render()
    for decision, count in (("adopted", 3), ("kept", 2), ("removed", 1)):
        assert f'zt_bridge_adoption_total{{decision="{decision}"}} {count}' in text, text
    # a new generation never gets a reqid or an SPI an adopted SA holds
    assert sa.next_reqid() > R3
    assert (NODE_A, 0x1111) in sa._held and (NODE_A, 0x5555) not in sa._held  # the removed one was released


async def test_on_demand_adopted_tunnels_are_judged_pair_by_pair_and_no_other_pair_gets_a_record(
    tmp_path: Path,
) -> None:
    store = await load_view(write_mesh(tmp_path))  # node-a admits {a1,b1} (initiator), {a1,b2}, {a2,b2}; not {a2,b1}
    dumps = [pod_tunnel(A1, B1, R1, 0x1111, 0x2222), pod_tunnel(A2, B1, R3, 0x5555, 0x6666)]
    xfrm = RecordingXfrm([s for d in dumps for s in d[0]], block_policy_dump() + [p for d in dumps for p in d[1]])
    sa = SaManager(cast(Any, xfrm), SaSettings(mesh_cidrs=MESH, on_demand=True))
    p = await sa.start(TunnelScope.POD)
    manager = TunnelManager(BridgeSettings(node="node-a", on_demand=True), store, sa, cast(Any, NoCertificates()),
                            cast(Any, None), BridgeMetrics(Registry()))  # fmt: skip
    manager.adopt(p)
    await manager.reconcile(store.view)
    # the admitted one is kept with its keys, the refused one removed; {a1,b2} and {a2,b2} wait for traffic
    assert {k: t.current.spi_in for k, t in manager.tunnels.items() if t.current} == {("pod", str(A1), str(B1)): 0x1111}
    assert set(manager.tunnels) == {("pod", str(A1), str(B1))}
    assert xfrm.deleted_spis() == {0x5555, 0x6666}
    assert [r["reason"] for r in manager.removals] == ["not admitted after restart"]


def test_ztctl_tunnels_lists_adopted_tunnels_with_their_spis() -> None:
    dump = {"node": "node-a", "tunnels": [{
        "local": "10.1.0.10", "local_address": "10.1.0.10", "peer": "10.2.0.10", "peer_address": "10.2.0.10",
        "local_identity": "", "peer_identity": "", "state": "adopted", "role": "unknown", "spi_in": "0x00001111",
        "spi_out": "0x00002222", "age_seconds": 12.0, "packets_in": 5, "packets_out": 7, "offload": "none",
    }]}  # fmt: skip
    (row,) = tunnels_rows([dump])
    assert "0x00001111" in row and "0x00002222" in row and row[-1] == "(adopted)" and "5/7" in row


async def test_node_scope_an_adopted_node_tunnel_gets_the_pod_pairs_the_state_admits(tmp_path: Path) -> None:
    store = await load_view(write_mesh(tmp_path))  # admitted pairs via node-b: a1-b1, a1-b2, a2-b2
    ep = node_ep()
    dump = (sas(ep, R1, 0x1111, 0x2222), pair_policies(ep, (host_net(A1), host_net(B1)), R1))
    xfrm = RecordingXfrm(dump[0], block_policy_dump() + dump[1])
    sa = SaManager(cast(Any, xfrm), SaSettings(mesh_cidrs=MESH))
    manager = TunnelManager(BridgeSettings(node="node-a", scope=TunnelScope.NODE), store, sa,
                            cast(Any, NoCertificates()), cast(Any, None), BridgeMetrics(Registry()))  # fmt: skip
    manager.adopt(await sa.start(TunnelScope.NODE))
    await manager.reconcile(store.view)
    t = manager.tunnels[("node", "node-a", "node-b")]
    assert t.current is not None and t.current.origin == "adopted" and t.spec.initiator  # lower node address
    assert len(t.spec.selectors) == 3 and xfrm.deleted_spis() == set()
    # the two pairs the old run did not have are pointed at the adopted generation until the rekey
    outs = [m.decode_policy(r.payload).policy for r in xfrm.requests if r.type == XfrmMsg.UPDPOLICY]
    outs = [p for p in outs if p.direction == PolicyDir.OUT and p.templates]  # (not the local pods' bypass)
    assert sorted(str(p.selector.src) + ">" + str(p.selector.dst) for p in outs) == [
        f"{A1}/32>{B2}/32", f"{A2}/32>{B2}/32",
    ]  # fmt: skip
    assert {p.templates[0].reqid for p in outs} == {R1}
