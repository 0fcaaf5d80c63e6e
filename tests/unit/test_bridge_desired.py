"""The desired-tunnels room (`ipsec_bridge.tunnels.desired.desired`), pinned as a table: from one NodeView (WDS
workloads, bridge addresses, policies, the VF map) to the tunnels node-a should have, who initiates each, the
refused pod pairs, the local pods that bypass the block, the certificates wanted and the node-address error.
The admission rule itself is test_bridge_pairs.py's table; this one is about what the bridge makes of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_address

import pytest

from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.state import NodeView, ViewSettings, build_view
from ipsec_bridge.tunnels.desired import Desired, desired, spec_now
from ipsec_bridge.tunnels.settings import BridgeSettings
from ipsec_bridge.vfmap import VfEntry, VfMap
from ztcore.identity import Identity
from ztcore.model.authz import Action, Authorization, Group, Match, Rules, Scope, StringMatch
from ztcore.model.workload import NetworkMode, Workload

SETTINGS = ViewSettings.parse(["10.0.0.0/8"], "cluster.local", "istio-system/ztunnel")
BRIDGE = Identity("cluster.local", "istio-system", "ztunnel")
A1_ID = Identity("cluster.local", "shop", "frontend")
A2_ID = Identity("cluster.local", "shop", "cart")


def pod(name: str, ns: str, sa: str, ip: str, node: str) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        addresses=(ip_address(ip),),
        service_account=sa,
        node=node,
    )


def bridge(node: str, ip: str) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/istio-system/zt-bridge-{node}",
        name=f"zt-bridge-{node}",
        namespace="istio-system",
        addresses=(ip_address(ip),),
        service_account="ztunnel",
        node=node,
        network_mode=NetworkMode.HOST_NETWORK,
    )


def deny_all(namespace: str) -> Authorization:
    return Authorization(f"deny-{namespace}", namespace, Scope.NAMESPACE, Action.DENY, (Group(),))


def allow_only(namespace: str, principal: str) -> Authorization:
    match = Match(principals=(StringMatch.exact(principal),))
    return Authorization(f"allow-{namespace}", namespace, Scope.NAMESPACE, Action.ALLOW, (Group((Rules((match,)),)),))


A1 = pod("a1", "shop", "frontend", "10.1.0.10", "node-a")
A2 = pod("a2", "shop", "cart", "10.1.0.11", "node-a")
B1 = pod("b1", "payments", "ledger", "10.2.0.10", "node-b")
C1 = pod("c1", "payments", "ledger", "10.3.0.10", "node-c")
Z1 = pod("z1", "payments", "ledger", "10.9.0.10", "node-z")  # no bridge runs on node-z
BRIDGES = (bridge("node-a", "192.168.50.1"), bridge("node-b", "192.168.50.2"), bridge("node-c", "192.168.50.3"))
NOT_A = BRIDGES[1:]


@dataclass(frozen=True)
class Case:
    workloads: tuple[Workload, ...]
    want: dict[tuple[str, str, str], bool]  # tunnel key -> node-a initiates it
    policies: tuple[Authorization, ...] = ()
    scope: TunnelScope = TunnelScope.POD
    node_address: str | None = None
    vf_map: VfMap | None = None
    refused: tuple[tuple[str, str], ...] = ()  # (local pod, peer pod) as NAMESPACE/NAME
    local_pods: tuple[str, ...] = ("10.1.0.10",)
    identities: frozenset[Identity] = field(default_factory=frozenset)
    error: bool = False  # the node-address error is set


def pod_key(local: str, peer: str) -> tuple[str, str, str]:
    return ("pod", local, peer)


CASES = [
    pytest.param(Case((A1, B1, *BRIDGES), {pod_key("10.1.0.10", "10.2.0.10"): True}, identities=frozenset({A1_ID})),
                 id="no-policy-lower-address-initiates"),
    pytest.param(Case((A1, B1, *BRIDGES), {}, policies=(deny_all("shop"), deny_all("payments")),
                      refused=(("shop/a1", "payments/b1"),)), id="denied-both-ways-refused"),
    pytest.param(Case((A1, B1, *BRIDGES), {pod_key("10.1.0.10", "10.2.0.10"): False},
                      policies=(deny_all("payments"), allow_only("shop", "cluster.local/ns/payments/sa/ledger")),
                      identities=frozenset({A1_ID})), id="only-the-peer-may-reach-us-peer-initiates"),
    pytest.param(Case((A1, B1, *NOT_A), {}, error=True), id="no-bridge-address-for-this-node"),
    pytest.param(Case((A1, B1, *NOT_A), {pod_key("10.1.0.10", "10.2.0.10"): True}, node_address="192.168.50.1",
                      identities=frozenset({A1_ID})), id="node-address-flag-stands-in"),
    pytest.param(Case((A1, Z1, *BRIDGES), {}), id="peer-node-without-a-bridge"),
    pytest.param(Case((A1, A2, *BRIDGES), {}, local_pods=("10.1.0.10", "10.1.0.11")), id="same-node-pods-no-tunnel"),
    pytest.param(Case((A1, B1, BRIDGES[0], bridge("node-b", "fd00::2"), BRIDGES[2]), {}),
                 id="peer-bridge-of-another-family"),
    pytest.param(Case((A1, A2, B1, C1, *BRIDGES),
                      {pod_key(a, p): True for a in ("10.1.0.10", "10.1.0.11") for p in ("10.2.0.10", "10.3.0.10")},
                      local_pods=("10.1.0.10", "10.1.0.11"), identities=frozenset({A1_ID, A2_ID})),
                 id="every-local-by-every-remote"),
    pytest.param(Case((A1, A2, B1, C1, *BRIDGES),
                      {pod_key("10.1.0.10", "10.2.0.10"): True, pod_key("10.1.0.10", "10.3.0.10"): True},
                      vf_map=VfMap((VfEntry(3, "shop/a1"),)), identities=frozenset({A1_ID})),
                 id="vf-map-leaves-a-pod-without-tunnels"),
    pytest.param(Case((A1, A2, B1, C1, *BRIDGES),
                      {("node", "node-a", "node-b"): True, ("node", "node-a", "node-c"): True},
                      scope=TunnelScope.NODE, local_pods=("10.1.0.10", "10.1.0.11"), identities=frozenset({BRIDGE})),
                 id="node-scope-one-per-peer-node"),
    pytest.param(Case((A1, *BRIDGES), {}, scope=TunnelScope.NODE, identities=frozenset({BRIDGE})),
                 id="node-scope-wants-its-certificate-before-any-tunnel"),
]  # fmt: skip


def view_of(case: Case) -> NodeView:
    return build_view(case.workloads, case.policies, SETTINGS, 1, node="node-a", vf_map=case.vf_map)


def settings_of(case: Case) -> BridgeSettings:
    address = ip_address(case.node_address) if case.node_address else None
    return BridgeSettings(node="node-a", scope=case.scope, node_address=address)


@pytest.mark.parametrize("case", CASES)
def test_desired_table(case: Case) -> None:
    got = desired(view_of(case), settings_of(case))
    assert {key: spec.initiator for key, spec in got.tunnels.items()} == case.want
    assert all(key == spec.key and spec.scope is case.scope for key, spec in got.tunnels.items())
    assert tuple((p.local.name, p.remote.name) for p in got.refused) == case.refused
    assert tuple(str(ip) for ip in got.local_pods) == case.local_pods
    assert got.identities == case.identities
    assert (got.error is not None) == case.error
    if case.error:
        assert got.error is not None and "no address for node node-a" in got.error and "--node-address" in got.error


@pytest.mark.parametrize("case", CASES)
def test_the_responder_recheck_agrees_with_the_table(case: Case) -> None:
    """`spec_now` (what a handshake rechecks mid-way) finds every desired tunnel as desired computes it."""
    view, settings = view_of(case), settings_of(case)
    got = desired(view, settings)
    for key, spec in got.tunnels.items():
        assert spec_now(view, settings, case.scope, key) == spec


def test_desired_is_a_function_of_the_view_alone() -> None:
    vf_map = VfMap((VfEntry(3, "shop/a1"),))
    case = Case((A1, A2, B1, C1, *BRIDGES), {}, policies=(deny_all("shop"), deny_all("payments")), vf_map=vf_map)
    first: Desired = desired(view_of(case), settings_of(case))
    assert desired(view_of(case), settings_of(case)) == first
    assert first.refused and not first.tunnels  # (the view is not a trivial one)


def test_node_tunnel_endpoints_and_pairs() -> None:
    """Node scope: the outer addresses are the bridges', the selectors are every admitted pod pair via that node."""
    got = desired(build_view((A1, A2, B1, *BRIDGES), (), SETTINGS, 1), BridgeSettings("node-a", TunnelScope.NODE))
    (spec,) = got.tunnels.values()
    assert (str(spec.endpoints.local_node), str(spec.endpoints.peer_node)) == ("192.168.50.1", "192.168.50.2")
    assert str(spec.endpoints.local_net) == str(spec.endpoints.peer_net) == "0.0.0.0/0"
    assert [(str(a), str(b)) for a, b in spec.selectors] == [
        ("10.1.0.10/32", "10.2.0.10/32"),
        ("10.1.0.11/32", "10.2.0.10/32"),
    ]
    assert spec.local_identity == spec.peer_identity == BRIDGE


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (("pod", "10.1.0.10", "10.9.9.9"), "10.9.9.9 is not a mesh pod"),
        (("pod", "10.2.0.10", "10.1.0.10"), "10.2.0.10 is not a mesh pod of node node-a"),
        (("pod", "10.1.0.10", "10.1.0.11"), "10.1.0.11 is not a pod of another node"),
    ],
)
def test_spec_now_says_why_a_tunnel_is_not_desired(key: tuple[str, str, str], reason: str) -> None:
    view = build_view((A1, A2, B1, *BRIDGES), (), SETTINGS, 1)
    assert spec_now(view, BridgeSettings("node-a"), TunnelScope.POD, key) == reason


def test_spec_now_without_a_node_address() -> None:
    view = build_view((A1, B1, *NOT_A), (), SETTINGS, 1)
    key = ("pod", "10.1.0.10", "10.2.0.10")
    assert spec_now(view, BridgeSettings("node-a"), TunnelScope.POD, key) == "no address for node node-a"


def test_a_pods_specs_share_its_address_net_and_name() -> None:
    """A node holds one spec per pair it talks to, ten or more per local pod: the pod's /32, its key string and its
    name are one object each, not one per spec (and the spec a handshake rechecks shares them too)."""
    case = Case((A1, B1, C1, *BRIDGES), {})
    view, settings = view_of(case), settings_of(case)
    to_b, to_c = (desired(view, settings).tunnels[pod_key("10.1.0.10", peer)] for peer in ("10.2.0.10", "10.3.0.10"))
    assert to_b.endpoints.local_net is to_c.endpoints.local_net
    assert to_b.selectors[0][0] is to_c.selectors[0][0] is to_b.endpoints.local_net
    assert to_b.key[1] is to_c.key[1] and to_b.local_name is to_c.local_name
    again = spec_now(view, settings, TunnelScope.POD, to_b.key)
    assert again == to_b and not isinstance(again, str) and again.endpoints.peer_net is to_b.endpoints.peer_net
