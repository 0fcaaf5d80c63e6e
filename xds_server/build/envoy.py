"""Envoy sidecar configuration from the translated registry: pure, no IO, no clock.

`build_for_proxy(translation, proxy)` gives, keyed by type URL, every Listener, Cluster,
ClusterLoadAssignment and RouteConfiguration one sidecar needs (an empty list means "none of this type"):

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
from dataclasses import dataclass
from itertools import groupby

from google.protobuf import message

from xds_server.build import resource_name
from xds_server.build.clusters import inbound_cluster, outbound_cluster
from xds_server.build.endpoints import load_assignment
from xds_server.build.listeners import inbound_listener, outbound_http_listener, outbound_tcp_listener
from xds_server.build.mesh import MeshIndex
from xds_server.build.proxy import SIDECAR, Proxy, ProxyError
from xds_server.build.routes import outbound_route_config
from ztcore.mesh.translate import Translation
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
    mesh = common.index
    listeners: list[message.Message] = []
    clusters: list[message.Message] = []
    routes: list[message.Message] = []

    workload = mesh.workload_of(proxy)
    inbound_ports: set[int] = set()
    if workload is not None:
        for port in mesh.inbound_ports(workload):
            listeners.append(inbound_listener(proxy.ip, port, mesh.trust_domain))
            clusters.append(inbound_cluster(port, proxy.localhost))
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
            listeners.append(outbound_http_listener(bind, number))
            http = [sp for sp in same_port if sp.protocol.is_http]
            routes.append(outbound_route_config(number, http, proxy.namespace))
        else:
            listeners.append(outbound_tcp_listener(bind, first))

    clusters.extend(common.clusters)
    return {
        typeurls.CLUSTER: sorted(clusters, key=resource_name),
        typeurls.ENDPOINT: sorted(common.endpoints, key=resource_name),
        typeurls.LISTENER: sorted(listeners, key=resource_name),
        typeurls.ROUTE: sorted(routes, key=resource_name),
    }


def to_resources(built: Mapping[str, Sequence[message.Message]]) -> dict[str, list[Resource]]:
    """Packed once, with content versions, ready for the snapshot cache."""
    return {type_url: [Resource.pack(resource_name(m), m) for m in msgs] for type_url, msgs in built.items()}
