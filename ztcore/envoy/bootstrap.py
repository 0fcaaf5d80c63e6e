"""Sidecar bootstraps: the ADS form (Envoy learns everything from ztd) and a static form that embeds what
`build_for_proxy` generated, with EDS and RDS inlined (Envoy without a control plane, `--mode validate`).

Both carry Istio's `sds-grpc` cluster to the node agent's Unix socket; the ADS form adds `xds-grpc` (HTTP/2)
and takes LDS and CDS from ADS, as pilot-agent's bootstrap does (tools/packaging/common/envoy_bootstrap.json).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import message, struct_pb2

from ztcore.envoy.common import HTTP_OPTIONS_KEY, SDS_CLUSTER, ads_config_source, pack, seconds, socket_address
from ztcore.xds import typeurls

XDS_CLUSTER = "xds-grpc"


def node(node_id: str, metadata: Mapping[str, str], cluster: str = "") -> base_pb2.Node:
    """Envoy needs a cluster name beside the id; without one given, the id's `<pod>.<namespace>` part."""
    if not cluster:
        parts = node_id.split("~")
        cluster = parts[2] if len(parts) == 4 and parts[2] else "istio-proxy"
    meta = struct_pb2.Struct()
    meta.update(dict(metadata))
    return base_pb2.Node(id=node_id, cluster=cluster, metadata=meta)


def _http2_options() -> dict[str, Any]:
    explicit = http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
        http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
    )
    return {HTTP_OPTIONS_KEY: pack(http_protocol_options_pb2.HttpProtocolOptions(explicit_http_config=explicit))}


def _static_cluster(name: str, address: address_pb2.Address) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=seconds(1),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=address))
                    ]
                )
            ],
        ),
    )
    for key, options in _http2_options().items():
        cluster.typed_extension_protocol_options[key].CopyFrom(options)
    return cluster


def sds_cluster(socket_path: str) -> cluster_pb2.Cluster:
    """`sds-grpc`: the node agent over its Unix socket."""
    return _static_cluster(SDS_CLUSTER, address_pb2.Address(pipe=address_pb2.Pipe(path=socket_path)))


def xds_cluster(ip: str, port: int) -> cluster_pb2.Cluster:
    """`xds-grpc`: ztd's xDS port (plaintext 15010 style)."""
    return _static_cluster(XDS_CLUSTER, socket_address(ip, port))


def _base(proxy_node: base_pb2.Node, admin_port: int) -> bootstrap_pb2.Bootstrap:
    boot = bootstrap_pb2.Bootstrap(node=proxy_node)
    boot.admin.address.CopyFrom(socket_address("127.0.0.1", admin_port))
    # Without a limit Envoy warns at start; Istio's bootstrap sets one too.
    layer = boot.layered_runtime.layers.add(name="static")
    layer.static_layer.update({"overload.global_downstream_max_connections": 2147483647})
    return boot


def ads_bootstrap(
    proxy_node: base_pb2.Node,
    *,
    xds_address: tuple[str, int],
    sds_socket: str,
    delta: bool = False,
    admin_port: int = 0,
    listeners: Iterable[listener_pb2.Listener] = (),
    clusters: Iterable[cluster_pb2.Cluster] = (),
) -> bootstrap_pb2.Bootstrap:
    """LDS and CDS (and through them EDS and RDS) over one ADS stream, SotW or Delta.

    `listeners`/`clusters` are embedded statically beside the two bootstrap clusters; their EDS and RDS
    references still resolve over ADS (used to validate generated resources exactly as generated).
    """
    boot = _base(proxy_node, admin_port)
    boot.static_resources.clusters.extend([xds_cluster(*xds_address), sds_cluster(sds_socket), *clusters])
    boot.static_resources.listeners.extend(listeners)
    api_type = config_source_pb2.ApiConfigSource.DELTA_GRPC if delta else config_source_pb2.ApiConfigSource.GRPC
    dyn = boot.dynamic_resources
    dyn.ads_config.CopyFrom(
        config_source_pb2.ApiConfigSource(
            api_type=api_type,
            transport_api_version=config_source_pb2.ApiVersion.V3,
            set_node_on_first_message_only=True,
            grpc_services=[
                grpc_service_pb2.GrpcService(
                    envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER)
                )
            ],
        )
    )
    dyn.lds_config.CopyFrom(ads_config_source())
    dyn.cds_config.CopyFrom(ads_config_source())
    return boot


def static_bootstrap(
    proxy_node: base_pb2.Node,
    built: Mapping[str, Sequence[message.Message]],
    *,
    sds_socket: str,
    admin_port: int = 0,
) -> bootstrap_pb2.Bootstrap:
    """Everything `built` holds, as static resources: no xDS server needed, only the node agent."""
    boot = _base(proxy_node, admin_port)
    listeners, clusters = inline(built)
    boot.static_resources.clusters.extend([sds_cluster(sds_socket), *clusters])
    boot.static_resources.listeners.extend(listeners)
    return boot


def inline(
    built: Mapping[str, Sequence[message.Message]],
) -> tuple[list[listener_pb2.Listener], list[cluster_pb2.Cluster]]:
    """Listeners with their RDS routes inlined and clusters with their EDS endpoints inlined (STATIC).

    A route or endpoint set `built` lacks becomes an empty one, as Envoy would see it over xDS.
    """
    routes: dict[str, Any] = {getattr(r, "name"): r for r in built.get(typeurls.ROUTE, ())}  # noqa: B009
    assignments: dict[str, Any] = {getattr(a, "cluster_name"): a for a in built.get(typeurls.ENDPOINT, ())}  # noqa: B009
    listeners = []
    for original in built.get(typeurls.LISTENER, ()):
        listener = listener_pb2.Listener()
        listener.CopyFrom(original)
        for chain in listener.filter_chains:
            for f in chain.filters:
                manager = hcm_pb2.HttpConnectionManager()
                if not f.typed_config.Unpack(manager) or not manager.HasField("rds"):
                    continue
                name = manager.rds.route_config_name
                manager.route_config.CopyFrom(routes.get(name, route_pb2.RouteConfiguration(name=name)))
                f.typed_config.CopyFrom(pack(manager))
        listeners.append(listener)
    clusters = []
    for original in built.get(typeurls.CLUSTER, ()):
        cluster = cluster_pb2.Cluster()
        cluster.CopyFrom(original)
        if cluster.type == cluster_pb2.Cluster.EDS:
            service = cluster.eds_cluster_config.service_name or cluster.name
            cluster.ClearField("eds_cluster_config")
            cluster.type = cluster_pb2.Cluster.STATIC
            cluster.load_assignment.CopyFrom(
                assignments.get(service, endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster.name))
            )
            cluster.load_assignment.cluster_name = cluster.name
        clusters.append(cluster)
    return listeners, clusters
