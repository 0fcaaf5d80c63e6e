"""Pure: which tunnels this node should have, from the NodeView alone (no IO, no clock).

The view carries everything that decides it: the WDS workloads (which pods are local, which nodes hold the
peers and at which bridge address), the policies (ipsec_bridge.pairs decides the admitted pod pairs and who
initiates) and the VF map (a local pod without a usable VF is not a local mesh pod). Each bridge computes the
same answer from the same WDS content, which is what keeps both ends of a tunnel in step.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import ip_address, ip_network

from ipsec_bridge.pairs import PodPair, TunnelScope, node_tunnels, pair_for, pod_pairs
from ipsec_bridge.sa_manager import Endpoints, PairSelector, host_net
from ipsec_bridge.state import NodeView
from ipsec_bridge.tunnels.settings import BridgeSettings, IPAddress, latency_critical
from ztcore.identity import Identity

TunnelKey = tuple[str, str, str]  # ("pod", local ip, peer ip) or ("node", local node, peer node)


@dataclass(frozen=True, slots=True)
class TunnelSpec:
    key: TunnelKey
    scope: TunnelScope
    initiator: bool
    endpoints: Endpoints
    selectors: tuple[PairSelector, ...]
    local_identity: Identity
    peer_identity: Identity
    local_name: str
    peer_name: str
    local_address: IPAddress  # what the keys bind: pod addresses, or node addresses in node scope
    peer_address: IPAddress
    peer_node: str

    def same_tunnel(self, other: TunnelSpec) -> bool:
        """Everything but the pod pairs a node tunnel carries: a change here means a new tunnel."""
        return self.initiator == other.initiator and self.same_keys(other)

    def same_keys(self, other: TunnelSpec) -> bool:
        """The same ends and identities, whoever initiates: the keys of one hold for the other. (A policy that
        now admits one direction only, or both again, moves the initiator and nothing else.)"""
        return (
            self.endpoints == other.endpoints
            and self.local_identity == other.local_identity
            and self.peer_identity == other.peer_identity
        )


@dataclass(frozen=True, slots=True)
class Desired:
    """Everything reconcile needs from one view."""

    tunnels: Mapping[TunnelKey, TunnelSpec]
    refused: tuple[PodPair, ...]  # pod pairs policy refuses (for the config dump)
    local_pods: tuple[IPAddress, ...]  # their traffic bypasses the block (ipsec_bridge.sa_manager)
    identities: frozenset[Identity]  # the certificates the tunnels need
    error: str | None = None  # why this node can have no tunnel at all


def local_address(view: NodeView, settings: BridgeSettings) -> IPAddress | None:
    """This node's underlay address: --node-address, else its bridge pod's address in WDS."""
    return settings.node_address or view.node_address(settings.node)


def address_error(view: NodeView, settings: BridgeSettings) -> str | None:
    """Why this node can have no tunnel at all (no underlay address), or None."""
    if local_address(view, settings) is not None:
        return None
    return (
        f"no address for node {settings.node}: no bridge pod of {view.settings.bridge_namespace}/"
        f"{view.settings.bridge_service_account} on it in WDS, and no --node-address"
    )


def pod_spec(view: NodeView, pair: PodPair, local_address: IPAddress) -> TunnelSpec | None:
    peer_address = view.node_address(pair.remote.node)
    if peer_address is None or peer_address.version != local_address.version:
        return None
    local_net, peer_net = host_net(pair.local.ip), host_net(pair.remote.ip)
    # interned: a local pod's address and name recur in each of its pairs' specs
    return TunnelSpec(
        key=("pod", sys.intern(str(pair.local.ip)), sys.intern(str(pair.remote.ip))),
        scope=TunnelScope.POD,
        initiator=pair.initiator,
        endpoints=Endpoints(local_address, peer_address, local_net, peer_net),
        selectors=((local_net, peer_net),),
        local_identity=pair.local.identity,
        peer_identity=pair.remote.identity,
        local_name=sys.intern(pair.local.name),
        peer_name=sys.intern(pair.remote.name),
        local_address=pair.local.ip,
        peer_address=pair.remote.ip,
        peer_node=pair.remote.node,
    )


def desired_specs(
    view: NodeView, node: str, scope: TunnelScope, node_address: IPAddress | None
) -> tuple[dict[TunnelKey, TunnelSpec], list[PodPair]]:
    """The tunnels this node should have, and the pod pairs policy refuses (for the config dump)."""
    local = node_address or view.node_address(node)
    if local is None:
        return {}, []
    admitted, refused = pod_pairs(view, node)
    specs: dict[TunnelKey, TunnelSpec] = {}
    if scope is TunnelScope.POD:
        for pair in admitted.values():
            spec = pod_spec(view, pair, local)
            if spec is not None:
                specs[spec.key] = spec
        return specs, refused
    bridge = view.settings.bridge_identity
    for peer, tunnel in node_tunnels(view, node, local).items():
        any_net = ip_network("0.0.0.0/0") if tunnel.local_address.version == 4 else ip_network("::/0")
        key: TunnelKey = ("node", node, peer)
        specs[key] = TunnelSpec(
            key=key,
            scope=TunnelScope.NODE,
            initiator=tunnel.initiator,
            endpoints=Endpoints(tunnel.local_address, tunnel.peer_address, any_net, any_net),
            selectors=tuple((host_net(p.local.ip), host_net(p.remote.ip)) for p in tunnel.pairs),
            local_identity=bridge,
            peer_identity=bridge,
            local_name=node,
            peer_name=peer,
            local_address=tunnel.local_address,
            peer_address=tunnel.peer_address,
            peer_node=peer,
        )
    return specs, refused


def desired(view: NodeView, settings: BridgeSettings) -> Desired:
    """The tunnels, refused pairs, bypassed local pods and needed certificates of `settings.node` in `view`."""
    specs, refused = desired_specs(view, settings.node, settings.scope, settings.node_address)
    error = address_error(view, settings)
    if settings.scope is TunnelScope.POD:
        identities = frozenset(spec.local_identity for spec in specs.values())
    else:  # node tunnels are keyed with the bridges' own identity, even before the first one exists
        identities = frozenset({view.settings.bridge_identity})
    return Desired(specs, tuple(refused), tuple(p.ip for p in view.pods_on(settings.node)), identities, error)


def local_desired(view: NodeView, settings: BridgeSettings) -> Desired:
    """On-demand set-up: what reconcile needs without asking about every pod pair (that would cost local x
    remote pods on every state change): the local pods (their bypass and trap policies) and their identities
    (a pair's handshake must not wait for a certificate). Tunnels come from ACQUIREs; existing ones and denied
    pairs are re-checked one by one with `spec_now`."""
    error = address_error(view, settings)
    pods = view.pods_on(settings.node)
    return Desired({}, (), tuple(p.ip for p in pods), frozenset(p.identity for p in pods), error)


def spec_now(view: NodeView, settings: BridgeSettings, scope: TunnelScope, key: TunnelKey) -> TunnelSpec | str:
    """The spec of tunnel `key` in `view`, or why the view has no such tunnel (the handshakes' recheck)."""
    local = local_address(view, settings)
    if local is None:
        return f"no address for node {settings.node}"
    if scope is TunnelScope.POD:
        pair = pair_for(view, settings.node, ip_address(key[1]), ip_address(key[2]))
        if isinstance(pair, str):
            return pair
        found = pod_spec(view, pair, local)
        return found if found is not None else f"no bridge address for node {pair.remote.node}"
    specs, _ = desired_specs(view, settings.node, scope, settings.node_address)
    return specs.get(key) or f"no admitted pod pair with node {key[2]}"


def pair_basis(view: NodeView, spec: TunnelSpec) -> tuple[int, object, object] | None:
    """What a pod tunnel's admission in `view` rests on, comparable across views by identity: the rules version
    and the two pods' workload objects (the store keeps an unchanged workload's object). None: a pod is gone."""
    local, peer = view.pod(spec.local_address), view.pod(spec.peer_address)
    if local is None or peer is None:
        return None
    return (view.rules_version, local.workload, peer.workload)


def pod_key_of(ep: Endpoints) -> TunnelKey:
    """The pod tunnel an adopted SA set's endpoints belong to (pod scope: the selectors are the two pods)."""
    return ("pod", str(ep.local_net.network_address), str(ep.peer_net.network_address))


def latency_critical_specs(view: NodeView, settings: BridgeSettings) -> dict[TunnelKey, TunnelSpec]:
    """On demand, the admitted pairs `--eager-for` marks: set up at once, as in eager mode. The cost is the marked
    pods times the other side's pods, never the whole local x remote mesh."""
    local = local_address(view, settings)
    if local is None or not settings.eager_for:
        return {}
    remotes = [r for r in view.pods_not_on(settings.node) if view.node_address(r.node) is not None]
    marked_remotes = [r for r in remotes if latency_critical(settings, r.identity)]
    out: dict[TunnelKey, TunnelSpec] = {}
    for pod in view.pods_on(settings.node):
        for remote in remotes if latency_critical(settings, pod.identity) else marked_remotes:
            if remote.ip.version != pod.ip.version:
                continue
            pair = pair_for(view, settings.node, pod.ip, remote.ip)
            spec = pod_spec(view, pair, local) if not isinstance(pair, str) else None
            if spec is not None:
                out[spec.key] = spec
    return out
