"""ClusterLoadAssignments (EDS): the workload addresses and target ports behind each outbound cluster."""

from __future__ import annotations

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from ztcore.envoy.common import socket_address
from ztcore.envoy.mesh import ServicePort


def load_assignment(sp: ServicePort) -> endpoint_pb2.ClusterLoadAssignment:
    """Every endpoint of the service port (possibly none: the cluster then warms with no hosts)."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=sp.cluster_name)
    if sp.endpoints:
        cla.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=socket_address(ep.address, ep.port)),
                        health_status=health_check_pb2.HealthStatus.HEALTHY,
                    )
                    for ep in sp.endpoints
                ]
            )
        )
    return cla
