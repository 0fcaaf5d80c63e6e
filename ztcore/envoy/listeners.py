"""Listeners: inbound ones terminating mTLS on the pod address, outbound ones on the app's side (loopback)."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from ztcore.envoy.common import (
    CORS_FILTER,
    FAULT_FILTER,
    GRPC_STATS_FILTER,
    HCM_FILTER,
    ROUTER_FILTER,
    TCP_PROXY_FILTER,
    ads_config_source,
    common_tls_context,
    downstream_tls,
    inbound_cluster_name,
    listener_name,
    network_filter,
    pack,
    socket_address,
    uri_san_prefix,
)
from ztcore.envoy.mesh import InboundPort, ServicePort
from ztcore.envoy.routes import inbound_route_config

HCM = hcm_pb2.HttpConnectionManager


def router_filter() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router()))


def http_filters(authz: Sequence[hcm_pb2.HttpFilter] = ()) -> list[hcm_pb2.HttpFilter]:
    """Every HTTP connection manager's filters, in istiod's order: authorization, then gRPC stats, fault and
    CORS (which routes' per-filter configs need), then the router. Istio's own Envoy build would add its
    metadata-exchange, ALPN and stats filters around them; upstream Envoy has none of those."""
    grpc_stats = grpc_stats_pb2.FilterConfig(emit_filter_state=True)
    grpc_stats.stats_for_all_methods.value = False
    return [
        *authz,
        hcm_pb2.HttpFilter(name=GRPC_STATS_FILTER, typed_config=pack(grpc_stats)),
        hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault())),
        hcm_pb2.HttpFilter(name=CORS_FILTER, typed_config=pack(cors_pb2.Cors())),
        router_filter(),
    ]


def tcp_proxy_filter(cluster: str) -> listener_components_pb2.Filter:
    return network_filter(TCP_PROXY_FILTER, tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster))


def inbound_listener(address: str, port: InboundPort, trust_domain: str) -> listener_pb2.Listener:
    """`<pod ip>_<target port>`: mTLS with a client certificate from this trust domain required, then the app.

    HTTP requests reach the app with `x-forwarded-client-cert` naming the caller's SPIFFE identity (as
    istiod's inbound listeners set it). Which callers are allowed is the authorization policies' job.
    """
    cluster = inbound_cluster_name(port.target_port)
    name = listener_name(address, port.target_port)
    if port.protocol.is_http:
        manager = HCM(
            stat_prefix=f"inbound_{name}",
            route_config=inbound_route_config(port.target_port),
            http_filters=http_filters(),
            forward_client_cert_details=HCM.APPEND_FORWARD,
            set_current_client_cert_details=HCM.SetCurrentClientCertDetails(dns=True, uri=True),
        )
        manager.set_current_client_cert_details.subject.value = True
        filters = [network_filter(HCM_FILTER, manager)]
        alpn: tuple[str, ...] = ("h2", "http/1.1")
    else:
        filters = [tcp_proxy_filter(cluster)]
        alpn = ()
    tls = downstream_tls(common_tls_context([uri_san_prefix(f"spiffe://{trust_domain}/")], alpn))
    return listener_pb2.Listener(
        name=name,
        address=socket_address(address, port.target_port),
        traffic_direction=base_pb2.TrafficDirection.INBOUND,
        filter_chains=[listener_components_pb2.FilterChain(name=cluster, filters=filters, transport_socket=tls)],
    )


def outbound_http_listener(address: str, port: int) -> listener_pb2.Listener:
    """`<bind>_<port>`: plaintext HTTP from the app, routed by Host through RDS resource `<port>`."""
    name = listener_name(address, port)
    manager = HCM(
        stat_prefix=f"outbound_{name}",
        rds=hcm_pb2.Rds(config_source=ads_config_source(), route_config_name=str(port)),
        http_filters=http_filters(),
    )
    return listener_pb2.Listener(
        name=name,
        address=socket_address(address, port),
        traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
        filter_chains=[listener_components_pb2.FilterChain(filters=[network_filter(HCM_FILTER, manager)])],
    )


def outbound_tcp_listener(address: str, sp: ServicePort) -> listener_pb2.Listener:
    """`<bind>_<port>`: every connection proxied to the one service that owns the port."""
    return listener_pb2.Listener(
        name=listener_name(address, sp.number),
        address=socket_address(address, sp.number),
        traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
        filter_chains=[listener_components_pb2.FilterChain(filters=[tcp_proxy_filter(sp.cluster_name)])],
    )
