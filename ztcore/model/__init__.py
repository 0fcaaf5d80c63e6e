"""Internal model of what ztunnel receives: workloads, services and L4 authorization policies.

Frozen, slotted dataclasses that stores and evaluators share freely. Protos appear only at the edge, in
each class's `to_pb()` / `from_pb()`.
"""

from ztcore.model.authz import (
    Action,
    Authorization,
    Cidr,
    Group,
    Match,
    MatchKind,
    Rules,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from ztcore.model.workload import (
    AppProtocol,
    IPFamilies,
    Locality,
    NetworkAddress,
    NetworkMode,
    Port,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
    WorkloadType,
)

__all__ = [
    "Action",
    "AppProtocol",
    "Authorization",
    "Cidr",
    "Group",
    "IPFamilies",
    "Locality",
    "Match",
    "MatchKind",
    "NetworkAddress",
    "NetworkMode",
    "Port",
    "Rules",
    "Scope",
    "Service",
    "ServiceAccountMatch",
    "StringMatch",
    "TunnelProtocol",
    "Workload",
    "WorkloadStatus",
    "WorkloadType",
]
