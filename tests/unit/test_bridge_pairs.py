"""The pair admission rule (ipsec_bridge.pairs), pinned as a table: which pod may reach which, and who initiates."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_address

import pytest

from ipsec_bridge.pairs import TunnelScope, admission, candidate_ports, evaluate_pair, node_tunnels, pod_pairs
from ipsec_bridge.state import MeshPod, ViewSettings, build_view
from ipsec_bridge.tunnels.desired import desired_specs
from ztcore.identity import Identity
from ztcore.model.authz import (
    Action,
    Authorization,
    Cidr,
    Group,
    Match,
    Rules,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from ztcore.model.workload import NetworkMode, Workload
from ztcore.rbac import PolicyIndex

SETTINGS = ViewSettings.parse(["10.0.0.0/8"], "cluster.local", "istio-system/ztunnel")


def workload(name: str, ns: str, sa: str, ip: str, node: str, policies: tuple[str, ...] = ()) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        addresses=(ip_address(ip),),
        service_account=sa,
        node=node,
        authorization_policies=policies,
    )


def pod(w: Workload) -> MeshPod:
    return MeshPod(w, w.addresses[0], w.identity())


SRC = workload("client", "shop", "frontend", "10.1.0.10", "node-a")
DST_NAME = ("ledger", "payments", "ledger", "10.2.0.10", "node-b")


def policy(
    action: Action, *matches: Match, name: str = "p", scope: Scope = Scope.NAMESPACE, dry: bool = False
) -> Authorization:
    groups = (Group((Rules(tuple(matches)),)),) if matches else (Group(),)
    return Authorization(name, "payments", scope, action, groups, dry_run=dry)


FRONTEND = Match(principals=(StringMatch.exact("cluster.local/ns/shop/sa/frontend"),))
OTHER = Match(principals=(StringMatch.exact("cluster.local/ns/shop/sa/cart"),))


def on(match: Match, *ports: int, negate: bool = False) -> Match:
    if negate:
        return dataclasses.replace(match, not_destination_ports=ports)
    return dataclasses.replace(match, destination_ports=ports)


CASES = [
    # (policies on the destination, admitted, ports)
    pytest.param([], True, "all", id="no-policy"),
    pytest.param([policy(Action.ALLOW, FRONTEND)], True, "all", id="allow-source-all-ports"),
    pytest.param([policy(Action.ALLOW, on(FRONTEND, 9000))], True, "9000", id="allow-source-one-port"),
    pytest.param([policy(Action.ALLOW, OTHER)], False, "none", id="allow-someone-else"),
    pytest.param([policy(Action.ALLOW, on(OTHER, 9000))], False, "none", id="allow-someone-else-on-a-port"),
    pytest.param([policy(Action.DENY, FRONTEND)], False, "none", id="deny-source-no-port"),
    pytest.param([policy(Action.DENY, on(FRONTEND, 22))], True, "all except 22", id="deny-source-one-port"),
    pytest.param(
        [policy(Action.ALLOW, on(FRONTEND, 9000), name="a"), policy(Action.DENY, on(FRONTEND, 9000), name="d")],
        False,
        "none",
        id="allow-and-deny-same-port",
    ),
    pytest.param([policy(Action.ALLOW, on(FRONTEND, 22, negate=True))], True, "all except 22", id="allow-not-port"),
    pytest.param([policy(Action.DENY, on(FRONTEND, 443, negate=True))], True, "443", id="deny-all-but-443"),
    pytest.param([policy(Action.DENY, FRONTEND, dry=True)], True, "all", id="dry-run-deny-ignored"),
    pytest.param([policy(Action.DENY, scope=Scope.GLOBAL)], False, "none", id="global-deny-everything"),
    pytest.param(
        [policy(Action.ALLOW, Match(namespaces=(StringMatch.exact("shop"),)))], True, "all", id="allow-namespace"
    ),
    pytest.param(
        [policy(Action.ALLOW, Match(service_accounts=(ServiceAccountMatch("shop", "frontend"),)))],
        True,
        "all",
        id="allow-service-account",
    ),
    pytest.param(
        [policy(Action.ALLOW, Match(source_ips=(Cidr.parse("10.1.0.10"),)))], True, "all", id="allow-source-ip"
    ),
    pytest.param(
        [policy(Action.ALLOW, Match(source_ips=(Cidr.parse("10.1.0.11"),)))], False, "none", id="allow-other-ip"
    ),
    pytest.param(
        [policy(Action.DENY, Match(not_principals=(StringMatch.exact("cluster.local/ns/shop/sa/frontend"),)))],
        True,
        "all",
        id="deny-everyone-else",
    ),
]


@pytest.mark.parametrize(("policies", "admitted", "ports"), CASES)
def test_admission_table(policies: list[Authorization], admitted: bool, ports: str) -> None:
    dst = pod(workload(*DST_NAME))
    verdict = admission(PolicyIndex(policies), pod(SRC), dst)
    assert (verdict.admitted, verdict.describe_ports()) == (admitted, ports), verdict.reason


def test_a_refusal_names_the_deciding_policy() -> None:
    dst = pod(workload(*DST_NAME))
    verdict = admission(PolicyIndex([policy(Action.DENY, FRONTEND, name="deny-frontend")]), pod(SRC), dst)
    assert not verdict.admitted
    assert verdict.policy == "payments/deny-frontend"
    assert verdict.reason == "DENY policy payments/deny-frontend matched"


def test_selector_policies_apply_only_to_the_workloads_that_list_them() -> None:
    pol = Authorization("only-ledger", "payments", Scope.WORKLOAD_SELECTOR, Action.DENY, (Group(),))
    listed = pod(workload(*DST_NAME, policies=("payments/only-ledger",)))
    unlisted = pod(workload("other", "payments", "other", "10.2.0.11", "node-b"))
    index = PolicyIndex([pol])
    assert not admission(index, pod(SRC), listed).admitted
    assert admission(index, pod(SRC), unlisted).admitted


def test_candidate_ports_are_the_named_ones_and_one_more() -> None:
    pols = [policy(Action.ALLOW, on(FRONTEND, 1, 3)), policy(Action.DENY, on(FRONTEND, 2, negate=True))]
    assert candidate_ports(pols) == ((1, 1), (2, 2), (3, 3), (0, 4))
    assert candidate_ports([]) == ((0, 1),)


@pytest.mark.parametrize(
    ("a_to_b", "b_to_a", "a_initiates"),
    [(True, True, True), (True, False, True), (False, True, False)],
)
def test_the_initiator_is_the_source_of_an_admitted_direction(a_to_b: bool, b_to_a: bool, a_initiates: bool) -> None:
    a = pod(workload("a", "ns-a", "sa", "10.1.0.10", "node-a", ("ns-a/lock",)))
    b = pod(workload("b", "ns-b", "sb", "10.2.0.10", "node-b", ("ns-b/lock",)))
    pols = []
    if not a_to_b:
        pols.append(Authorization("lock", "ns-b", Scope.WORKLOAD_SELECTOR, Action.DENY, (Group(),)))
    if not b_to_a:
        pols.append(Authorization("lock", "ns-a", Scope.WORKLOAD_SELECTOR, Action.DENY, (Group(),)))
    view = build_view([a.workload, b.workload, *_bridges()], pols, SETTINGS, 1)
    from_a = evaluate_pair(view, a, b)
    from_b = evaluate_pair(view, b, a)
    assert from_a.initiator is a_initiates
    assert from_b.initiator is not a_initiates  # exactly one side initiates


def _bridges() -> list[Workload]:
    return [
        Workload(
            uid=f"Kubernetes//Pod/istio-system/zt-bridge-{n}",
            name=f"zt-bridge-{n}",
            namespace="istio-system",
            addresses=(ip_address(ip),),
            service_account="ztunnel",
            node=n,
            network_mode=NetworkMode.HOST_NETWORK,
        )
        for n, ip in (("node-a", "192.168.50.1"), ("node-b", "192.168.50.2"), ("node-c", "192.168.50.3"))
    ]


def test_addresses_claimed_twice_get_no_tunnel() -> None:
    dup = workload("impostor", "shop", "debug", "10.2.0.10", "node-b")
    view = build_view([SRC, workload(*DST_NAME), dup, *_bridges()], [], SETTINGS, 1)
    assert ip_address("10.2.0.10") not in view.pods_by_ip
    assert view.conflicts[ip_address("10.2.0.10")] == ("payments/ledger", "shop/impostor")
    admitted, _ = pod_pairs(view, "node-a")
    assert admitted == {}


def test_pods_outside_the_mesh_cidr_or_without_a_bridge_on_their_node_get_no_tunnel() -> None:
    outside = workload("outside", "shop", "cart", "172.16.0.5", "node-b")
    no_bridge = workload("lonely", "shop", "cart", "10.9.0.5", "node-z")
    view = build_view([SRC, outside, no_bridge, *_bridges()], [], SETTINGS, 1)
    assert ip_address("172.16.0.5") not in view.pods_by_ip
    assert pod_pairs(view, "node-a") == ({}, [])


def test_node_scope_one_tunnel_per_peer_node_with_the_admitted_pairs() -> None:
    b1 = workload("b1", "payments", "ledger", "10.2.0.10", "node-b")
    b2 = workload("b2", "payments", "ledger", "10.2.0.11", "node-b")
    c1 = workload("c1", "payments", "ledger", "10.3.0.10", "node-c")
    deny_c1 = Authorization("no-c1", "payments", Scope.NAMESPACE, Action.DENY,
                            (Group((Rules((Match(destination_ips=(Cidr.parse("10.3.0.10"),)),)),)),))  # fmt: skip
    deny_back = Authorization("lock", "shop", Scope.NAMESPACE, Action.DENY,
                              (Group((Rules((Match(source_ips=(Cidr.parse("10.3.0.10"),)),)),)),))  # fmt: skip
    view = build_view([SRC, b1, b2, c1, *_bridges()], [deny_c1, deny_back], SETTINGS, 1)
    tunnels = node_tunnels(view, "node-a")
    assert list(tunnels) == ["node-b"]  # node-c's only pod refuses node-a's and is refused by it
    (tb,) = tunnels.values()
    assert tb.initiator and str(tb.peer_address) == "192.168.50.2"
    assert [str(p.remote.ip) for p in tb.pairs] == ["10.2.0.10", "10.2.0.11"]
    specs, _ = desired_specs(view, "node-a", TunnelScope.NODE, None)
    (spec,) = specs.values()
    assert spec.key == ("node", "node-a", "node-b")
    assert spec.local_identity == spec.peer_identity == Identity("cluster.local", "istio-system", "ztunnel")
    assert [(str(a), str(b)) for a, b in spec.selectors] == [
        ("10.1.0.10/32", "10.2.0.10/32"),
        ("10.1.0.10/32", "10.2.0.11/32"),
    ]
    # seen from node-b the same tunnel, not initiated there
    from_b = desired_specs(view, "node-b", TunnelScope.NODE, None)[0]
    assert not from_b[("node", "node-b", "node-a")].initiator
    assert from_b[("node", "node-b", "node-c")].initiator  # c1 may reach b1/b2; 192.168.50.2 < .3
