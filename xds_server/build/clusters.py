"""Clusters: outbound ones per service port (EDS, mTLS with SPIFFE SAN checks) and inbound ones to the app."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from xds_server.build.common import (
    CONNECT_TIMEOUT_SECONDS,
    Protocol,
    ads_config_source,
    common_tls_context,
    http_protocol_options,
    inbound_cluster_name,
    outbound_sni,
    seconds,
    socket_address,
    upstream_tls,
    uri_san_exact,
)
from xds_server.build.mesh import InboundPort, ServicePort


def _alpn(protocol: Protocol) -> tuple[str, ...]:
    # Offered to the peer sidecar, whose inbound listener accepts both.
    if protocol is Protocol.HTTP2:
        return ("h2",)
    return ("http/1.1",) if protocol is Protocol.HTTP else ()


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
