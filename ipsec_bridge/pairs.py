"""Which tunnels a node should have: pure functions of a NodeView and the node's name.

The admission rule (pinned by tests/unit/test_bridge_pairs.py)
----------------------------------------------------------------
A tunnel carries every port between two pods, but policies speak of ports. "May pod S reach pod D" is
decided by evaluating D's L4 policies exactly as ztunnel does (`ztcore.rbac.evaluate`, with S's identity
and address) for every port that matters: each port any applicable policy names, plus one port none names
(all unnamed ports behave alike). S is *admitted* to D when at least one of those ports is allowed. So:

- no ALLOW policy and no matching DENY: admitted;
- an ALLOW policy that matches S, on all ports or on some: admitted;
- ALLOW policies exist but none matches S (on any port): not admitted;
- a DENY policy that matches S with no port condition: not admitted (it denies every port);
- a DENY policy on some ports only: admitted (the other ports stay allowed).

A pod pair {A, B} gets a tunnel when A is admitted to B or B is admitted to A; the tunnel then carries
traffic both ways (replies need it), so port and direction enforcement inside a tunnel remains the L4
proxy's job. The *initiator* of the pair's handshake is the source of an admitted direction (the pod with
the lower address when both are admitted); its bridge drives the handshake and every rekey, so the two
bridges never race. Each bridge computes the same answer from the same WDS content.

`--tunnel-scope node` keys one tunnel per pair of nodes with the bridges' own identities; the admitted pod
pairs still decide which pod traffic may use it (one allow policy per admitted pair, the rest stays blocked).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ipsec_bridge.state import MeshPod, NodeView
from ztcore.model.authz import Authorization
from ztcore.rbac import Connection, PolicyIndex, evaluate

IPAddress = IPv4Address | IPv6Address
MAX_PORT = 65535


class TunnelScope(enum.StrEnum):
    POD = "pod"
    NODE = "node"


@dataclass(frozen=True, slots=True)
class Admission:
    """May `src` reach `dst`: the verdict, the ports that decided it and why."""

    admitted: bool
    allowed_ports: tuple[int, ...]  # 0 stands for "every port no policy names"
    reason: str
    policy: str | None = None  # the deciding policy of the first allowed port (or of the denial)
    denied_ports: tuple[int, ...] = ()

    def describe_ports(self) -> str:
        """ "all", "all except 22,25", "9000,9001" or "none"."""
        if not self.allowed_ports:
            return "none"
        if 0 in self.allowed_ports:
            denied = ",".join(str(p) for p in self.denied_ports if p)
            return f"all except {denied}" if denied else "all"
        return ",".join(str(p) for p in self.allowed_ports)


def _ports_named(policies: Iterable[Authorization]) -> set[int]:
    ports: set[int] = set()
    for pol in policies:
        for group in pol.groups:
            for rules in group.rules:
                for match in rules.matches:
                    ports.update(match.destination_ports)
                    ports.update(match.not_destination_ports)
    return {p for p in ports if 0 < p <= MAX_PORT}


def candidate_ports(policies: Iterable[Authorization]) -> tuple[tuple[int, int], ...]:
    """(label, port to evaluate) pairs: every named port, then one port no policy names (label 0)."""
    named = _ports_named(policies)
    other = next((p for p in range(1, MAX_PORT + 1) if p not in named), None)
    out = [(p, p) for p in sorted(named)]
    if other is not None:
        out.append((0, other))
    return tuple(out)


def admission(policies: PolicyIndex, src: MeshPod, dst: MeshPod) -> Admission:
    applicable, _ = policies.applicable(dst.workload)
    allowed: list[int] = []
    denied: list[int] = []
    first_allow: str | None = None
    denial = ""
    denial_policy: str | None = None
    for label, port in candidate_ports(applicable):
        decision = evaluate(policies, Connection(src.identity, src.ip, dst.ip, port, dst.workload))
        if decision.allowed:
            allowed.append(label)
            if first_allow is None:
                first_allow = decision.policy
        else:
            denied.append(label)
            if not denial:
                denial, denial_policy = decision.reason, decision.policy
    if allowed:
        ports = Admission(True, tuple(allowed), "", denied_ports=tuple(denied)).describe_ports()
        reason = f"{src.identity} may reach {dst.name} on ports: {ports}"
        return Admission(True, tuple(allowed), reason, first_allow, tuple(denied))
    return Admission(False, (), denial or "no port is allowed", denial_policy, tuple(denied))


@dataclass(frozen=True, slots=True)
class PodPair:
    """A tunnel between a pod of this node and a pod of another, as seen from this node."""

    local: MeshPod
    remote: MeshPod
    initiator: bool  # this node drives the handshake and the rekeys
    outbound: Admission  # local -> remote
    inbound: Admission  # remote -> local

    @property
    def key(self) -> tuple[IPAddress, IPAddress]:
        return (self.local.ip, self.remote.ip)


def _initiates(a: MeshPod, b: MeshPod, a_to_b: Admission, b_to_a: Admission) -> bool:
    """Whether `a`'s side initiates: the source of an admitted direction; the lower address on a tie."""
    if a_to_b.admitted and b_to_a.admitted:
        return (a.ip.version, int(a.ip)) < (b.ip.version, int(b.ip))
    return a_to_b.admitted


def evaluate_pair(view: NodeView, local: MeshPod, remote: MeshPod) -> PodPair:
    out = admission(view.policies, local, remote)
    back = admission(view.policies, remote, local)
    return PodPair(local, remote, _initiates(local, remote, out, back), out, back)


def pod_pairs(view: NodeView, node: str) -> tuple[dict[tuple[IPAddress, IPAddress], PodPair], list[PodPair]]:
    """(admitted pairs by (local ip, remote ip), refused pairs) for every local x remote pod of the same family."""
    admitted: dict[tuple[IPAddress, IPAddress], PodPair] = {}
    refused: list[PodPair] = []
    remotes = [r for r in view.pods_not_on(node) if view.node_address(r.node) is not None]
    for local in view.pods_on(node):
        for remote in remotes:
            if remote.ip.version != local.ip.version:
                continue
            pair = evaluate_pair(view, local, remote)
            if pair.outbound.admitted or pair.inbound.admitted:
                admitted[pair.key] = pair
            else:
                refused.append(pair)
    return admitted, refused


def pair_for(view: NodeView, node: str, local_ip: IPAddress, remote_ip: IPAddress) -> PodPair | str:
    """The admitted pair (local_ip on this node, remote_ip elsewhere), or why there is none (responder check)."""
    local = view.pod(local_ip)
    remote = view.pod(remote_ip)
    if local_ip in view.conflicts or remote_ip in view.conflicts:
        ip = local_ip if local_ip in view.conflicts else remote_ip
        return f"{ip} is claimed by several workloads ({', '.join(view.conflicts[ip])})"
    if local is None or local.node != node:
        return f"{local_ip} is not a mesh pod of node {node}"
    if remote is None:
        return f"{remote_ip} is not a mesh pod"
    if remote.node == node or not remote.node:
        return f"{remote_ip} is not a pod of another node"
    pair = evaluate_pair(view, local, remote)
    if not (pair.outbound.admitted or pair.inbound.admitted):
        return f"policy admits neither direction ({pair.inbound.reason}; {pair.outbound.reason})"
    return pair


@dataclass(frozen=True, slots=True)
class NodeTunnel:
    """--tunnel-scope node: one keyed tunnel per peer node; `pairs` are the pod pairs allowed through it."""

    peer_node: str
    local_address: IPAddress
    peer_address: IPAddress
    initiator: bool
    pairs: tuple[PodPair, ...]


def node_tunnels(view: NodeView, node: str, local_address: IPAddress | None = None) -> dict[str, NodeTunnel]:
    """One tunnel per peer node with at least one admitted pod pair; the lower node address initiates.

    `local_address` overrides this node's address from WDS (--node-address)."""
    local_address = local_address or view.node_address(node)
    if local_address is None:
        return {}
    admitted, _ = pod_pairs(view, node)
    by_node: dict[str, list[PodPair]] = {}
    for pair in admitted.values():
        by_node.setdefault(pair.remote.node, []).append(pair)
    out: dict[str, NodeTunnel] = {}
    for peer, pairs in sorted(by_node.items()):
        peer_address = view.node_address(peer)
        if peer_address is None or peer_address.version != local_address.version:
            continue
        initiator = (local_address.version, int(local_address), node) < (peer_address.version, int(peer_address), peer)
        out[peer] = NodeTunnel(peer, local_address, peer_address, initiator, tuple(sorted(pairs, key=lambda p: p.key)))
    return out
