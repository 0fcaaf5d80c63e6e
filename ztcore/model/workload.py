"""Workloads and services as ztunnel receives them (`istio.workload.Address`).

Only the fields ztdpu fills are modelled; waypoints, network gateways, load balancing and extensions are
not (our registry has nothing that produces them), and `from_pb` ignores them.
"""

from __future__ import annotations

import enum
import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from protos.istio.workload import workload_pb2 as pb
from ztcore.identity import Identity
from ztcore.model.authz import IPAddress

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"


class TunnelProtocol(enum.IntEnum):
    NONE = 0
    HBONE = 1
    LEGACY_ISTIO_MTLS = 2


class WorkloadStatus(enum.IntEnum):
    HEALTHY = 0
    UNHEALTHY = 1


class WorkloadType(enum.IntEnum):
    DEPLOYMENT = 0
    CRONJOB = 1
    POD = 2
    JOB = 3


class AppProtocol(enum.IntEnum):
    UNKNOWN = 0
    HTTP11 = 1
    HTTP2 = 2
    GRPC = 3
    TCP = 4
    TLS = 5


class NetworkMode(enum.IntEnum):
    STANDARD = 0
    HOST_NETWORK = 1


class IPFamilies(enum.IntEnum):
    AUTOMATIC = 0
    IPV4_ONLY = 1
    IPV6_ONLY = 2
    DUAL = 3


def _ip(raw: bytes) -> IPAddress:
    if len(raw) not in (4, 16):
        raise ValueError(f"address of {len(raw)} bytes is neither IPv4 nor IPv6")
    return ipaddress.ip_address(raw)


@dataclass(frozen=True, slots=True)
class Port:
    service_port: int
    target_port: int  # 0: a named target port the workload resolves (Service ports only)
    app_protocol: AppProtocol = AppProtocol.UNKNOWN

    def to_pb(self) -> pb.Port:
        return pb.Port(
            service_port=self.service_port,
            target_port=self.target_port,
            app_protocol=pb.AppProtocol.Value(self.app_protocol.name),
        )

    @classmethod
    def from_pb(cls, msg: pb.Port) -> Port:
        return cls(msg.service_port, msg.target_port, AppProtocol(msg.app_protocol))


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""

    def to_pb(self) -> pb.Locality:
        return pb.Locality(region=self.region, zone=self.zone, subzone=self.subzone)


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    network: str
    address: IPAddress
    length: int | None = None  # set for a CIDR rather than a single address

    @property
    def alias(self) -> str:
        """The on-demand lookup key `<network>/<ip>` (or `<network>/<ip>/<len>`); the network may be empty."""
        suffix = f"/{self.length}" if self.length is not None else ""
        return f"{self.network}/{self.address}{suffix}"

    def to_pb(self) -> pb.NetworkAddress:
        msg = pb.NetworkAddress(network=self.network, address=self.address.packed)
        if self.length is not None:
            msg.length = self.length
        return msg

    @classmethod
    def from_pb(cls, msg: pb.NetworkAddress) -> NetworkAddress:
        return cls(msg.network, _ip(msg.address), msg.length if msg.HasField("length") else None)


ServicePorts = tuple[tuple[str, tuple[Port, ...]], ...]


def freeze_services(services: Mapping[str, Iterable[Port]]) -> ServicePorts:
    """The services map as a sorted tuple of (ns/hostname, ports): hashable, and deterministic in order."""
    return tuple((key, tuple(ports)) for key, ports in sorted(services.items()))


@dataclass(frozen=True, slots=True)
class Workload:
    uid: str
    name: str
    namespace: str
    addresses: tuple[IPAddress, ...] = ()
    hostname: str = ""
    network: str = ""
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    # Empty means the mesh default (cluster.local); istiod elides the default.
    trust_domain: str = ""
    service_account: str = ""
    node: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: WorkloadType = WorkloadType.DEPLOYMENT
    workload_name: str = ""
    native_tunnel: bool = False
    # "<namespace>/<hostname>" -> the ports this workload serves for that service (see freeze_services).
    services: ServicePorts = ()
    # Selector-based policies only, as "<namespace>/<name>"; namespace and global ones apply implicitly.
    authorization_policies: tuple[str, ...] = ()
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    cluster_id: str = ""
    locality: Locality | None = None
    network_mode: NetworkMode = NetworkMode.STANDARD

    @property
    def services_map(self) -> dict[str, tuple[Port, ...]]:
        return dict(self.services)

    def identity(self, default_trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Identity:
        """spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>, filling elided defaults as ztunnel does."""
        return Identity(
            self.trust_domain or default_trust_domain,
            self.namespace,
            self.service_account or DEFAULT_SERVICE_ACCOUNT,
        )

    def aliases(self) -> tuple[str, ...]:
        """`<network>/<ip>` for every address: the names ztunnel may subscribe to on demand."""
        return tuple(f"{self.network}/{ip}" for ip in self.addresses)

    def to_pb(self) -> pb.Workload:
        msg = pb.Workload(
            uid=self.uid,
            name=self.name,
            namespace=self.namespace,
            addresses=[ip.packed for ip in self.addresses],
            hostname=self.hostname,
            network=self.network,
            tunnel_protocol=pb.TunnelProtocol.Value(self.tunnel_protocol.name),
            trust_domain=self.trust_domain,
            service_account=self.service_account,
            node=self.node,
            canonical_name=self.canonical_name,
            canonical_revision=self.canonical_revision,
            workload_type=pb.WorkloadType.Value(self.workload_type.name),
            workload_name=self.workload_name,
            native_tunnel=self.native_tunnel,
            authorization_policies=list(self.authorization_policies),
            status=pb.WorkloadStatus.Value(self.status.name),
            cluster_id=self.cluster_id,
            network_mode=pb.NetworkMode.Value(self.network_mode.name),
        )
        for key, ports in self.services:
            msg.services[key].ports.extend(p.to_pb() for p in ports)
        if self.locality is not None:
            msg.locality.CopyFrom(self.locality.to_pb())
        return msg

    def to_address_pb(self) -> pb.Address:
        return pb.Address(workload=self.to_pb())

    @classmethod
    def from_pb(cls, msg: pb.Workload) -> Workload:
        """ValueError for a malformed address or an enum value this model does not know."""
        locality = None
        if msg.HasField("locality"):
            locality = Locality(msg.locality.region, msg.locality.zone, msg.locality.subzone)
        # the fields that repeat across a cluster's workloads are interned: one string each, not one per workload
        # (a node's bridge holds every workload of the mesh: ~3 MiB at 10,000)
        shared = sys.intern
        return cls(
            uid=msg.uid,
            name=msg.name,
            namespace=shared(msg.namespace),
            addresses=tuple(_ip(a) for a in msg.addresses),
            hostname=msg.hostname,
            network=shared(msg.network),
            tunnel_protocol=TunnelProtocol(msg.tunnel_protocol),
            trust_domain=shared(msg.trust_domain),
            service_account=shared(msg.service_account),
            node=shared(msg.node),
            canonical_name=shared(msg.canonical_name),
            canonical_revision=shared(msg.canonical_revision),
            workload_type=WorkloadType(msg.workload_type),
            workload_name=msg.workload_name,
            native_tunnel=msg.native_tunnel,
            services=freeze_services(
                {key: [Port.from_pb(p) for p in plist.ports] for key, plist in msg.services.items()}
            ),
            authorization_policies=tuple(msg.authorization_policies),
            status=WorkloadStatus(msg.status),
            cluster_id=shared(msg.cluster_id),
            locality=locality,
            network_mode=NetworkMode(msg.network_mode),
        )


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    hostname: str
    addresses: tuple[NetworkAddress, ...] = ()  # VIPs; empty for a headless service
    ports: tuple[Port, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    ip_families: IPFamilies = IPFamilies.AUTOMATIC
    canonical: bool = False

    @property
    def key(self) -> str:
        """The xDS resource name: "<namespace>/<hostname>"."""
        return f"{self.namespace}/{self.hostname}"

    def aliases(self) -> tuple[str, ...]:
        return tuple(a.alias for a in self.addresses)

    def to_pb(self) -> pb.Service:
        return pb.Service(
            name=self.name,
            namespace=self.namespace,
            hostname=self.hostname,
            addresses=[a.to_pb() for a in self.addresses],
            ports=[p.to_pb() for p in self.ports],
            subject_alt_names=list(self.subject_alt_names),
            ip_families=pb.IPFamilies.Value(self.ip_families.name),
            canonical=self.canonical,
        )

    def to_address_pb(self) -> pb.Address:
        return pb.Address(service=self.to_pb())

    @classmethod
    def from_pb(cls, msg: pb.Service) -> Service:
        return cls(
            name=msg.name,
            namespace=msg.namespace,
            hostname=msg.hostname,
            addresses=tuple(NetworkAddress.from_pb(a) for a in msg.addresses),
            ports=tuple(Port.from_pb(p) for p in msg.ports),
            subject_alt_names=tuple(msg.subject_alt_names),
            ip_families=IPFamilies(msg.ip_families),
            canonical=msg.canonical,
        )
