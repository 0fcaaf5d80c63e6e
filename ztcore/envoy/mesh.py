"""The translation, indexed for Envoy builders: per service port its endpoints and the identities behind them.

Built once per translation and shared by every sidecar (nothing here depends on the proxy). Endpoints are the
healthy workloads with an identity (pods; istiod does not send unhealthy endpoints by default either): an
opaque EndpointSlice address has no SPIFFE identity to check, so an mTLS-only sidecar never sends to it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ztcore.envoy.common import Protocol, outbound_cluster_name
from ztcore.envoy.proxy import Proxy
from ztcore.mesh.translate import Translation
from ztcore.model.workload import Port, Service, Workload, WorkloadStatus


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int  # the workload's target port


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of one service: an outbound cluster."""

    service: Service
    port: Port
    protocol: Protocol
    endpoints: tuple[Endpoint, ...]
    sans: tuple[str, ...]  # SPIFFE URIs of the workloads behind the service (any port), sorted

    @property
    def number(self) -> int:
        return self.port.service_port

    @property
    def hostname(self) -> str:
        return self.service.hostname

    @property
    def cluster_name(self) -> str:
        return outbound_cluster_name(self.number, self.hostname)


@dataclass(frozen=True, slots=True)
class InboundPort:
    """A port the proxy's own workload serves: an inbound listener and cluster."""

    target_port: int
    protocol: Protocol
    service_key: str  # "<namespace>/<hostname>" of the first service that names the port


@dataclass(frozen=True, slots=True)
class MeshIndex:
    trust_domain: str
    service_ports: tuple[ServicePort, ...]  # sorted by (port, hostname)
    services: Mapping[str, Service]  # by "<namespace>/<hostname>"
    workloads: Mapping[str, Workload]  # by uid
    cluster_id: str

    @classmethod
    def of(cls, translation: Translation) -> MeshIndex:
        opts = translation.options
        services = {s.key: s for s in translation.services}
        endpoints: dict[tuple[str, int], list[Endpoint]] = defaultdict(list)
        identities: dict[str, set[str]] = defaultdict(set)
        for w in translation.workloads:
            if not w.addresses or not w.service_account:
                continue
            uri = w.identity(opts.trust_domain).uri
            # An unhealthy pod's identity stays accepted, so that its recovery does not change the clusters.
            healthy = w.status is WorkloadStatus.HEALTHY
            for key, ports in w.services:
                identities[key].add(uri)
                if not healthy:
                    continue
                for p in ports:
                    if p.target_port:
                        endpoints[(key, p.service_port)].append(Endpoint(str(w.addresses[0]), p.target_port))
        service_ports = []
        for s in translation.services:
            sans = tuple(sorted(identities[s.key] | set(s.subject_alt_names)))
            seen: set[int] = set()
            for p in s.ports:
                if p.service_port in seen:
                    continue
                seen.add(p.service_port)
                eps = tuple(sorted(set(endpoints[(s.key, p.service_port)]), key=lambda e: (e.address, e.port)))
                service_ports.append(ServicePort(s, p, Protocol.of(p.app_protocol), eps, sans))
        service_ports.sort(key=lambda sp: (sp.number, sp.hostname))
        return cls(
            trust_domain=opts.trust_domain,
            service_ports=tuple(service_ports),
            services=MappingProxyType(services),
            workloads=MappingProxyType({w.uid: w for w in translation.workloads}),
            cluster_id=opts.cluster_id,
        )

    def workload_of(self, proxy: Proxy) -> Workload | None:
        """The proxy's own pod: by name, else by address within its namespace (istiod finds it by IP)."""
        found = self.workloads.get(f"{self.cluster_id}//Pod/{proxy.namespace}/{proxy.pod_name}")
        if found is not None:
            return found
        for w in self.workloads.values():
            if w.namespace == proxy.namespace and any(str(a) == proxy.ip for a in w.addresses):
                return w
        return None

    def inbound_ports(self, workload: Workload) -> tuple[InboundPort, ...]:
        """One per target port the workload serves for its services; the first service (by key) decides the
        protocol when two services share a target port."""
        out: dict[int, InboundPort] = {}
        for key, ports in workload.services:
            service = self.services.get(key)
            if service is None:
                continue
            protocols = {p.service_port: Protocol.of(p.app_protocol) for p in service.ports}
            for p in ports:
                if p.target_port and p.target_port not in out:
                    out[p.target_port] = InboundPort(p.target_port, protocols.get(p.service_port, Protocol.TCP), key)
        return tuple(out[port] for port in sorted(out))
