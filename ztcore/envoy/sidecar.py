"""Envoy sidecar configuration from the translated registry: pure, no IO, no clock.

`build_for_proxy(translation, proxy)` gives, keyed by type URL, every Listener, Cluster,
ClusterLoadAssignment and RouteConfiguration one sidecar needs (an empty list means "none of this type").

A captured sidecar (interception REDIRECT, Istio's default, or TPROXY) gets istiod's shape, see capture.py:
`virtualOutbound` 15001 / `virtualInbound` 15006, inbound chains per target port and PeerAuthentication mode
(peerauth.py) carrying the RBAC filters of the AuthorizationPolicies that select the pod (rbac.py), outbound
`0.0.0.0_<port>` (HTTP) and `<vip>_<port>` (TCP) listeners without sockets, and Passthrough/BlackHole/
InboundPassthrough clusters per meshConfig.outboundTrafficPolicy. Under interception NONE:

- inbound, for each target port its pod serves (first service by key decides the protocol):
  listener `<pod ip>_<port>` terminating mTLS (`default`/`ROOTCA` by SDS from `sds-grpc`, client
  certificate of the mesh trust domain required), then HTTP (inline route) or TCP to cluster
  `inbound|<port>||`, which is the application on loopback;
- outbound, for each service port in the mesh: cluster `outbound|<port>||<hostname>` (EDS over ADS; mTLS
  presenting `default`, validating `ROOTCA` and the exact SPIFFE URIs of the service's workloads), its
  ClusterLoadAssignment, and a listener `<bind>_<port>` on loopback: HTTP ports share RDS resource
  `<port>` (a virtual host per service), a TCP port proxies to the first service (by hostname) on it.
  The first service on a port decides its protocol; services of the other kind there get no listener
  (istiod's port-conflict rule), and an outbound listener that would take an inbound one's socket is left out.

Outbound clusters and endpoints depend on the mesh only, routes on the proxy's namespace too; listeners
and inbound clusters are per proxy. To build many proxies from one translation, build its `SharedConfig`
once and pass it as `shared=`: the outbound clusters and endpoints are then built once, and shared.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby

from google.protobuf import message

from ztcore.envoy import rbac, resource_name
from ztcore.envoy.capture import WILDCARD, InboundAuthz, unbound, virtual_inbound, virtual_outbound
from ztcore.envoy.clusters import (
    blackhole_cluster,
    inbound_captured_cluster,
    inbound_cluster,
    inbound_passthrough_cluster,
    outbound_cluster,
    passthrough_cluster,
)
from ztcore.envoy.common import PASSTHROUGH_CLUSTER
from ztcore.envoy.endpoints import load_assignment
from ztcore.envoy.listeners import inbound_listener, outbound_http_listener, outbound_tcp_listener
from ztcore.envoy.mesh import MeshIndex
from ztcore.envoy.peerauth import compose
from ztcore.envoy.proxy import INTERCEPTION_TPROXY, SIDECAR, Proxy, ProxyError
from ztcore.envoy.routes import catch_all_virtual_host, outbound_route_config
from ztcore.mesh.registry.objects import EMPTY_LABELS, Labels
from ztcore.mesh.translate import Translation
from ztcore.mesh.translate.mesh import REGISTRY_ONLY
from ztcore.xds import typeurls
from ztcore.xds.resources import Resource


@dataclass(frozen=True, slots=True)
class SharedConfig:
    """What every sidecar of one translation gets alike: the index, outbound clusters and their endpoints.

    Built once per translation (`SharedConfig.of`), it makes `build_for_proxy` cost only the per-proxy part.
    Its messages are shared by every proxy built from it: nobody may modify them.
    """

    index: MeshIndex
    clusters: tuple[message.Message, ...]
    endpoints: tuple[message.Message, ...]

    @classmethod
    def of(cls, translation: Translation) -> SharedConfig:
        index = MeshIndex.of(translation)
        return cls(
            index,
            tuple(outbound_cluster(sp) for sp in index.service_ports),
            tuple(load_assignment(sp) for sp in index.service_ports),
        )


def build_for_proxy(
    translation: Translation, proxy: Proxy, *, shared: SharedConfig | None = None
) -> dict[str, list[message.Message]]:
    """Everything one sidecar needs, keyed by type URL, each list sorted by resource name.

    `shared` must come from this `translation` (it is built here when not given).
    ProxyError for a node that is not a sidecar (gateways and ztunnels get no Envoy config from here).
    """
    if proxy.type != SIDECAR:
        raise ProxyError(f"node {proxy.node_id!r} is a {proxy.type}; only sidecars get Envoy configuration")
    common = shared if shared is not None else SharedConfig.of(translation)
    built = _captured(translation, proxy, common) if proxy.captured else _bound(proxy, common)
    built.clusters.extend(common.clusters)
    return {
        typeurls.CLUSTER: sorted(built.clusters, key=resource_name),
        typeurls.ENDPOINT: sorted(common.endpoints, key=resource_name),
        typeurls.LISTENER: sorted(built.listeners, key=resource_name),
        typeurls.ROUTE: sorted(built.routes, key=resource_name),
    }


@dataclass
class _Built:
    listeners: list[message.Message] = field(default_factory=list)
    clusters: list[message.Message] = field(default_factory=list)
    routes: list[message.Message] = field(default_factory=list)


def _bound(proxy: Proxy, common: SharedConfig) -> _Built:
    """Interception NONE: inbound listeners on the pod address, outbound ones on loopback (or the bind)."""
    mesh = common.index
    out = _Built()
    workload = mesh.workload_of(proxy)
    inbound_ports: set[int] = set()
    if workload is not None:
        for port in mesh.inbound_ports(workload):
            out.listeners.append(inbound_listener(proxy.ip, port, mesh.trust_domain))
            out.clusters.append(inbound_cluster(port, proxy.localhost))
            inbound_ports.add(port.target_port)

    bind = proxy.outbound_address
    # Outbound listeners that would take an inbound one's socket are left out (inbound wins).
    shares_inbound_socket = bind == proxy.ip or ipaddress.ip_address(bind).is_unspecified
    for number, group in groupby(mesh.service_ports, key=lambda sp: sp.number):
        same_port = list(group)
        if shares_inbound_socket and number in inbound_ports:
            continue
        first = same_port[0]
        if first.protocol.is_http:
            out.listeners.append(outbound_http_listener(bind, number))
            http = [sp for sp in same_port if sp.protocol.is_http]
            out.routes.append(outbound_route_config(number, http, proxy.namespace))
        else:
            out.listeners.append(outbound_tcp_listener(bind, first))
    return out


def _captured(translation: Translation, proxy: Proxy, common: SharedConfig) -> _Built:
    """Interception REDIRECT/TPROXY: istiod's virtual listeners (capture.py) and the clusters they use."""
    mesh = common.index
    opts = translation.options
    registry_only = opts.outbound_traffic_policy == REGISTRY_ONLY
    transparent = proxy.interception == INTERCEPTION_TPROXY
    out = _Built()
    out.clusters += [blackhole_cluster(), passthrough_cluster(), inbound_passthrough_cluster()]

    workload = mesh.workload_of(proxy)
    ports = mesh.inbound_ports(workload) if workload is not None else ()
    namespace = workload.namespace if workload is not None else proxy.namespace
    labels = translation.pod_labels(namespace, workload.name) if workload is not None else EMPTY_LABELS
    peer_auth = compose(translation.peer_authentications, namespace, labels, opts.root_namespace)
    authz = inbound_authz(translation, namespace, labels)
    out.listeners.append(virtual_inbound(ports, peer_auth, authz, mesh.trust_domain, transparent=transparent))
    out.clusters += [inbound_captured_cluster(port) for port in ports]

    out.listeners.append(virtual_outbound(registry_only, transparent=transparent))
    catch_all = catch_all_virtual_host(None if registry_only else PASSTHROUGH_CLUSTER)
    for number, group in groupby(mesh.service_ports, key=lambda sp: sp.number):
        same_port = list(group)
        first = same_port[0]
        if first.protocol.is_http:
            # One wildcard listener per HTTP port: the Host header picks the service (or the catch-all).
            out.listeners.append(unbound(outbound_http_listener(WILDCARD, number)))
            route = outbound_route_config(number, [sp for sp in same_port if sp.protocol.is_http], proxy.namespace)
            route.virtual_hosts.append(catch_all)
            out.routes.append(route)
        for sp in same_port:
            if sp.protocol.is_http:
                continue
            # A TCP service is told apart by its VIP; a headless one (no VIP) by each endpoint's address, on the
            # service port (istiod: one listener per endpoint, never the proxy's own address).
            addresses = [str(vip.address) for vip in sp.service.addresses] or sorted(
                {e.address for e in sp.endpoints} - set(proxy.ip_addresses)
            )
            for address in addresses:
                out.listeners.append(unbound(outbound_tcp_listener(address, sp)))
    return out


def inbound_authz(translation: Translation, namespace: str, labels: Labels) -> InboundAuthz:
    """The RBAC filters of a workload's inbound chains, from the AuthorizationPolicies that select it.

    A policy istiod's validation would reject is left out, not the whole proxy; `notes` says so, and carries
    the converter's notes (a CUSTOM policy failing closed, request principals without a JWT filter, ...).
    """
    opts = translation.options
    selected = rbac.policies_for(translation.authorization_policies, namespace, labels, opts.root_namespace)
    notes: list[tuple[str, str]] = []
    try:
        built = rbac.build(selected, trust_domain=opts.trust_domain)
    except ValueError:
        valid = []
        for policy in selected:
            try:
                rbac.build([policy], trust_domain=opts.trust_domain)
            except ValueError as err:
                notes.append((f"{policy.namespace}/{policy.name}", f"left out: {err}"))
                continue
            valid.append(policy)
        built = rbac.build(valid, trust_domain=opts.trust_domain)
    notes += [(key, text) for key, texts in built.messages.items() for text in texts]
    return InboundAuthz(built.http, built.tcp, tuple(notes))


def to_resources(built: Mapping[str, Sequence[message.Message]]) -> dict[str, list[Resource]]:
    """Packed once, with content versions, ready for the snapshot cache."""
    return {type_url: [Resource.pack(resource_name(m), m) for m in msgs] for type_url, msgs in built.items()}
