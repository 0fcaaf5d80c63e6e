"""Clusters: outbound ones per service port (EDS, mTLS with SPIFFE SAN checks) and inbound ones to the app."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import duration_pb2

from ztcore.envoy.common import (
    BLACKHOLE_CLUSTER,
    CONNECT_TIMEOUT_SECONDS,
    HTTP_OPTIONS_KEY,
    INBOUND_PASSTHROUGH_BIND,
    INBOUND_PASSTHROUGH_CLUSTER,
    PASSTHROUGH_CLUSTER,
    Protocol,
    ads_config_source,
    common_tls_context,
    http_protocol_options,
    inbound_cluster_name,
    outbound_sni,
    pack,
    seconds,
    socket_address,
    upstream_tls,
    uri_san_exact,
)
from ztcore.envoy.mesh import InboundPort, ServicePort


def _alpn(protocol: Protocol) -> tuple[str, ...]:
    # The in-mesh ALPN values an istiod-configured client puts on mTLS to a peer sidecar (its istio.alpn
    # filter sets istio-http/1.1 or istio-h2 per request; upstream Envoy has no such filter, so the cluster
    # offers the value its own protocol would get). A captured peer's PERMISSIVE chains match mTLS by them.
    if protocol is Protocol.HTTP2:
        return ("istio-h2",)
    return ("istio-http/1.1",) if protocol is Protocol.HTTP else ("istio",)


def outbound_cluster(sp: ServicePort) -> cluster_pb2.Cluster:
    """`outbound|<port>||<hostname>`: endpoints by EDS, mTLS presenting `default`, peers checked against
    `ROOTCA` and the exact SPIFFE identities of the service's workloads."""
    name = sp.cluster_name
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_config_source(), service_name=name),
        connect_timeout=seconds(CONNECT_TIMEOUT_SECONDS),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        transport_socket=upstream_tls(
            common_tls_context([uri_san_exact(san) for san in sp.sans], _alpn(sp.protocol)),
            sni=outbound_sni(sp.number, sp.hostname),
        ),
    )
    for key, options in http_protocol_options(sp.protocol).items():
        cluster.typed_extension_protocol_options[key].CopyFrom(options)
    return cluster


def inbound_cluster(port: InboundPort, localhost: str) -> cluster_pb2.Cluster:
    """`inbound|<port>||`: plaintext to the application on loopback (it must listen there, not on the pod IP)."""
    name = inbound_cluster_name(port.target_port)
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=seconds(CONNECT_TIMEOUT_SECONDS),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=socket_address(localhost, port.target_port)
                            )
                        )
                    ]
                )
            ],
        ),
    )
    for key, options in http_protocol_options(port.protocol).items():
        cluster.typed_extension_protocol_options[key].CopyFrom(options)
    return cluster


# istiod never cleans up hosts of an inbound original-destination cluster: the longest interval Envoy takes
# (nanoseconds in an int64, ~292 years), as istiod writes it.
_NEVER = duration_pb2.Duration(seconds=(2**63 - 1 - 999_999_999) // 10**9)


def _original_dst(name: str, bind: str = "") -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        connect_timeout=seconds(CONNECT_TIMEOUT_SECONDS),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
    )
    if bind:
        # 127.0.0.6: istio-iptables lets a sidecar's own traffic from this source reach the app uncaptured.
        cluster.upstream_bind_config.source_address.CopyFrom(address_pb2.SocketAddress(address=bind, port_value=0))
    return cluster


def _use_downstream_protocol(cluster: cluster_pb2.Cluster) -> None:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.use_downstream_protocol_config.http_protocol_options.SetInParent()
    options.use_downstream_protocol_config.http2_protocol_options.SetInParent()
    cluster.typed_extension_protocol_options[HTTP_OPTIONS_KEY].CopyFrom(pack(options))


def passthrough_cluster() -> cluster_pb2.Cluster:
    """`PassthroughCluster`: an outbound connection to where the application sent it (ALLOW_ANY)."""
    cluster = _original_dst(PASSTHROUGH_CLUSTER)
    _use_downstream_protocol(cluster)
    return cluster


def blackhole_cluster() -> cluster_pb2.Cluster:
    """`BlackHoleCluster`: no endpoints; what REGISTRY_ONLY and loops to the capture ports end in."""
    return cluster_pb2.Cluster(
        name=BLACKHOLE_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=seconds(CONNECT_TIMEOUT_SECONDS),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )


def inbound_passthrough_cluster(bind: str = INBOUND_PASSTHROUGH_BIND) -> cluster_pb2.Cluster:
    """`InboundPassthroughCluster`: captured inbound traffic to a port no service declares, to the app."""
    cluster = _original_dst(INBOUND_PASSTHROUGH_CLUSTER, bind)
    _use_downstream_protocol(cluster)
    return cluster


def inbound_captured_cluster(port: InboundPort, bind: str = INBOUND_PASSTHROUGH_BIND) -> cluster_pb2.Cluster:
    """`inbound|<port>||` of a captured sidecar: to the original destination (the pod IP and port the client
    dialled), so the application listens on its pod IP or the wildcard, as under istiod."""
    cluster = _original_dst(inbound_cluster_name(port.target_port), bind)
    cluster.cleanup_interval.CopyFrom(_NEVER)
    for key, options in http_protocol_options(port.protocol).items():
        cluster.typed_extension_protocol_options[key].CopyFrom(options)
    return cluster
