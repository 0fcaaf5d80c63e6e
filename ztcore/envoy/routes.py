"""RouteConfigurations: outbound ones per HTTP port (one virtual host per service, matched by Host), and the
inline inbound one that hands every request to the local application."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from google.protobuf import wrappers_pb2

from ztcore.envoy.common import inbound_cluster_name, pack, seconds
from ztcore.envoy.mesh import ServicePort
from ztcore.model.workload import Service

DEFAULT_ROUTE = "default"


def _retry_policy() -> route_components_pb2.RetryPolicy:
    """istiod's default retries: twice, on connection-level failures and 503, never the same host again."""
    return route_components_pb2.RetryPolicy(
        retry_on="connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        num_retries=wrappers_pb2.UInt32Value(value=2),
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=5,
        retriable_status_codes=[503],
    )


def _route_action(cluster: str, *, retries: bool) -> route_components_pb2.RouteAction:
    # No route timeout, as istiod (timeouts belong to the application unless a VirtualService sets one).
    action = route_components_pb2.RouteAction(
        cluster=cluster,
        timeout=seconds(0),
        max_stream_duration=route_components_pb2.RouteAction.MaxStreamDuration(
            max_stream_duration=seconds(0), grpc_timeout_header_max=seconds(0)
        ),
    )
    if retries:
        action.retry_policy.CopyFrom(_retry_policy())
    return action


def _with_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def vhost_domains(service: Service, port: int, proxy_namespace: str) -> list[str]:
    """The Host values that reach `service`: its FQDN, the shorter names a pod of `proxy_namespace` can
    resolve, and its VIPs; each bare and with `:<port>` (istio generateVirtualHostDomains)."""
    names = [service.hostname]
    prefix = f"{service.name}.{service.namespace}.svc."
    if service.hostname.startswith(prefix):
        names.append(prefix[:-1])  # name.ns.svc
        names.append(f"{service.name}.{service.namespace}")
        if proxy_namespace == service.namespace:
            names.append(service.name)
    names.extend(str(a.address) for a in service.addresses)
    out: list[str] = []
    for name in names:
        for domain in (name, _with_port(name, port)):
            if domain not in out:
                out.append(domain)
    return out


def outbound_route_config(
    port: int, service_ports: Sequence[ServicePort], proxy_namespace: str
) -> route_pb2.RouteConfiguration:
    """RDS resource `<port>`: shared by every HTTP service on that port; no catch-all host (registry only)."""
    config = route_pb2.RouteConfiguration(name=str(port), validate_clusters=wrappers_pb2.BoolValue(value=False))
    used: set[str] = set()
    for sp in sorted(service_ports, key=lambda s: s.hostname):
        # A domain may appear once per RouteConfiguration; the first service (by hostname) keeps it.
        domains = [d for d in vhost_domains(sp.service, port, proxy_namespace) if d not in used]
        used.update(domains)
        config.virtual_hosts.append(
            route_components_pb2.VirtualHost(
                name=f"{sp.hostname}:{port}",
                domains=domains,
                routes=[
                    route_components_pb2.Route(
                        name=DEFAULT_ROUTE,
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=_route_action(sp.cluster_name, retries=True),
                    )
                ],
            )
        )
    return config


def catch_all_virtual_host(passthrough: str | None) -> route_components_pb2.VirtualHost:
    """The last virtual host of a captured sidecar's outbound routes, for Hosts the registry does not know:
    `allow_any` to `passthrough` (the original destination), or `block_all` answering 502 (REGISTRY_ONLY)."""
    if passthrough is None:
        return route_components_pb2.VirtualHost(
            name="block_all",
            domains=["*"],
            routes=[
                route_components_pb2.Route(
                    name="block_all",
                    match=route_components_pb2.RouteMatch(prefix="/"),
                    direct_response=route_components_pb2.DirectResponseAction(status=502),
                )
            ],
        )
    return route_components_pb2.VirtualHost(
        name="allow_any",
        domains=["*"],
        routes=[
            route_components_pb2.Route(
                name="allow_any",
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=_route_action(passthrough, retries=False),
            )
        ],
    )


def inbound_route_config(port: int, cluster: str = "") -> route_pb2.RouteConfiguration:
    """Inline in the inbound listener: any Host, straight to the application (`cluster`, by default the
    port's inbound cluster)."""
    name = cluster or inbound_cluster_name(port)
    return route_pb2.RouteConfiguration(
        name=name,
        validate_clusters=wrappers_pb2.BoolValue(value=False),
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=f"inbound|http|{port}",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        name=DEFAULT_ROUTE,
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=_route_action(name, retries=False),
                    )
                ],
            )
        ],
    )
