"""Pods, Services and EndpointSlices -> `Workload` and `Service`, following istiod's ambient index.

Rules taken from Istio (pilot/pkg/serviceregistry/ambient/workloads.go podWorkloadBuilder,
endpointSlicesBuilder; services.go constructService; pkg/config/kube ConvertProtocol):

- Every pod with an IP that is not finished (Failed/Succeeded) is a workload, enrolled or not; only
  `tunnel_protocol` says whether it speaks HBONE. uid `<cluster>//Pod/<ns>/<name>`.
- The trust domain is elided when it is the default (cluster.local); the service account is sent as is.
- `services` maps `<ns>/<hostname>` to the ports the pod serves: a named targetPort resolves to the pod's
  TCP container port of that name, and the port is left out when the pod has none.
- `authorization_policies` lists selector-based AuthorizationPolicies (of the pod's namespace or the root
  namespace) whose selector matches, sorted, then the PeerAuthentication-derived ones.
- Host-network pods are workloads with network_mode HOST_NETWORK; the CNI never captures them.
- EndpointSlice endpoints that are not pods become opaque HOST_NETWORK workloads of their service.

Enrollment (HBONE) comes from what the istio-cni would decide, since the registry has no CNI to annotate
pods: the pod's `istio.io/dataplane-mode` label when present (only "ambient" enrolls), else the namespace's;
never for host-network pods, sidecar-injected pods or ztunnel itself. An explicit
`ambient.istio.io/redirection` annotation (what the CNI writes) wins.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ztcore.mesh.registry.objects import EndpointSlice, Namespace, Node, Pod, ServicePort
from ztcore.mesh.registry.objects import Service as KubeService
from ztcore.model.authz import IPAddress
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
    freeze_services,
)

DEFAULT_TRUST_DOMAIN = "cluster.local"

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
TUNNEL_LABEL = "networking.istio.io/tunnel"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"

_CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
_TERMINAL_PHASES = ("Failed", "Succeeded")
# Ports Istio treats as TCP when the port name says nothing (SMTP, DNS, MySQL, MongoDB).
_WELL_KNOWN_TCP_PORTS = (25, 53, 3306, 27017)
_PROTOCOLS = {
    "http": AppProtocol.HTTP11,
    "http2": AppProtocol.HTTP2,
    "grpc": AppProtocol.GRPC,
    "https": AppProtocol.TLS,
    "tls": AppProtocol.TLS,
    "tcp": AppProtocol.TCP,
}
# Protocols Istio knows but ztunnel has no AppProtocol for.
_OTHER_KNOWN_PROTOCOLS = ("udp", "grpc-web", "http_proxy", "mongo", "redis", "mysql")


@dataclass(frozen=True, slots=True)
class WorkloadSettings:
    cluster_id: str = "Kubernetes"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    network: str = ""
    domain_suffix: str = "cluster.local"
    system_namespace: str = "istio-system"


@dataclass(frozen=True, slots=True)
class SelectorPolicy:
    """A converted AuthorizationPolicy with a non-empty selector: attached to the workloads it selects."""

    key: str
    namespace: str
    selector: Mapping[str, str]


def pod_uid(cluster_id: str, namespace: str, name: str) -> str:
    return f"{cluster_id}//Pod/{namespace}/{name}"


def service_hostname(svc: KubeService, domain_suffix: str) -> str:
    return f"{svc.name}.{svc.namespace}.svc.{domain_suffix}"


# --- services ---------------------------------------------------------------------------------------------


def app_protocol(port: ServicePort) -> AppProtocol:
    """Istio's protocol of a Service port (appProtocol, else the port name prefix) as ztunnel's AppProtocol."""
    if port.protocol == "UDP":
        return AppProtocol.UNKNOWN
    name = port.name
    if port.app_protocol is not None:
        name = port.app_protocol
        if name == "kubernetes.io/h2c":
            return AppProtocol.HTTP2
        if name in ("kubernetes.io/ws", "kubernetes.io/wss"):
            return AppProtocol.HTTP11
    if name.lower().startswith("grpc-web"):
        return AppProtocol.UNKNOWN
    prefix = name.split("-", 1)[0].lower()
    if prefix in _PROTOCOLS:
        return _PROTOCOLS[prefix]
    if prefix not in _OTHER_KNOWN_PROTOCOLS and port.port in _WELL_KNOWN_TCP_PORTS:
        return AppProtocol.TCP
    return AppProtocol.UNKNOWN


def build_service(svc: KubeService, settings: WorkloadSettings) -> Service | None:
    """The WDS Service, or None for an ExternalName service (ambient leaves those to DNS)."""
    if svc.type == "ExternalName":
        return None
    ports = tuple(
        Port(p.port, p.target_port if isinstance(p.target_port, int) else 0, app_protocol(p)) for p in svc.ports
    )
    addresses = tuple(NetworkAddress(settings.network, ipaddress.ip_address(ip)) for ip in svc.cluster_ips)
    return Service(
        name=svc.name,
        namespace=svc.namespace,
        hostname=service_hostname(svc, settings.domain_suffix),
        addresses=addresses,
        ports=ports,
        ip_families=_ip_families(svc.ip_families),
        # A Kubernetes Service is always the canonical owner of its hostname.
        canonical=True,
    )


def _ip_families(families: Sequence[str]) -> IPFamilies:
    """spec.ipFamilies as istiod reports it: both -> DUAL, one -> that family only, none -> AUTOMATIC."""
    if len(families) == 2:
        return IPFamilies.DUAL
    if len(families) == 1:
        return IPFamilies.IPV4_ONLY if families[0] == "IPv4" else IPFamilies.IPV6_ONLY
    return IPFamilies.AUTOMATIC


# --- pods ---------------------------------------------------------------------------------------------------


def _find_port_name(pod: Pod, name: str) -> int | None:
    for p in pod.container_ports:
        if p.name == name and p.protocol == "TCP":
            return p.container_port
    return None


def _pod_service_ports(pod: Pod, svc: KubeService) -> tuple[Port, ...]:
    ports = []
    for p in svc.ports:
        if isinstance(p.target_port, str):
            target = _find_port_name(pod, p.target_port)
            if target is None:
                continue  # this pod does not serve the port
        else:
            target = p.target_port
        ports.append(Port(p.port, target))
    return tuple(ports)


def _captured(pod: Pod, namespace: Namespace | None, system_namespace: str) -> bool:
    redirection = pod.meta.annotations.get(REDIRECTION_ANNOTATION)
    if redirection is not None:
        return redirection == "enabled"
    if pod.host_network or SIDECAR_STATUS_ANNOTATION in pod.meta.annotations:
        return False
    if pod.namespace == system_namespace and pod.labels.get("app") == "ztunnel":
        return False
    mode = pod.labels.get(DATAPLANE_MODE_LABEL)
    if mode is not None:
        return mode == DATAPLANE_MODE_AMBIENT
    return namespace is not None and namespace.labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT


def _first_label(labels: Mapping[str, str], keys: Sequence[str], default: str) -> str:
    for key in keys:
        if key in labels:
            return labels[key]
    return default


def node_locality(node: Node | None) -> Locality | None:
    if node is None:
        return None
    labels = node.labels
    region, zone, subzone = labels.get(REGION_LABEL, ""), labels.get(ZONE_LABEL, ""), labels.get(SUBZONE_LABEL, "")
    if not (region or zone or subzone):
        return None
    return Locality(region, zone, subzone)


@dataclass(frozen=True, slots=True)
class NamespaceServices:
    """One namespace's (non-ExternalName) services, prepared for matching each of its pods."""

    selecting: tuple[tuple[KubeService, tuple[tuple[str, str], ...]], ...]  # services with a selector
    by_name: Mapping[str, KubeService]
    # pod name -> (service name, pod uid or "") from EndpointSlices naming the pod, in slice order.
    slice_refs: Mapping[str, tuple[tuple[str, str], ...]]

    @classmethod
    def build(cls, services: Iterable[KubeService], slices: Iterable[EndpointSlice]) -> NamespaceServices:
        services = list(services)
        refs: dict[str, list[tuple[str, str]]] = {}
        for es in slices:
            if not es.service_name or es.address_type == "FQDN":
                continue
            for ep in es.endpoints:
                ref = ep.target_ref
                if ref is not None and ref.kind == "Pod" and (ref.namespace or es.namespace) == es.namespace:
                    refs.setdefault(ref.name, []).append((es.service_name, ref.uid))
        return cls(
            selecting=tuple((s, tuple(s.selector.items())) for s in services if s.selector),
            by_name={s.name: s for s in services},
            slice_refs={name: tuple(r) for name, r in refs.items()},
        )

    def for_pod(self, pod: Pod) -> list[KubeService]:
        """Services that select the pod, then selector-less ones whose EndpointSlice names it."""
        labels = dict(pod.labels)
        selected = [svc for svc, sel in self.selecting if all(labels.get(k) == v for k, v in sel)]
        seen = {s.name for s in selected}
        for svc_name, uid in self.slice_refs.get(pod.name, ()):
            if svc_name in seen or (uid and uid != pod.uid) or svc_name not in self.by_name:
                continue
            selected.append(self.by_name[svc_name])
            seen.add(svc_name)
        return selected


def build_pod_workload(
    pod: Pod,
    *,
    namespace: Namespace | None,
    node: Node | None,
    services: Sequence[KubeService],
    policies: Sequence[str],
    settings: WorkloadSettings,
) -> Workload | None:
    """The pod's workload, or None if it has none (finished, or no IP yet).

    `services` are the (non-ExternalName) services the pod backs, `policies` the authorization policy
    names it references, in order.
    """
    if pod.phase in _TERMINAL_PHASES or not pod.pod_ips:
        return None
    addresses: list[IPAddress] = []
    for ip in pod.pod_ips:
        try:
            addresses.append(ipaddress.ip_address(ip))
        except ValueError:
            return None  # istiod skips a pod with a garbage IP
    captured = _captured(pod, namespace, settings.system_namespace)
    native = pod.labels.get(TUNNEL_LABEL) == "http"
    return Workload(
        uid=pod_uid(settings.cluster_id, pod.namespace, pod.name),
        name=pod.name,
        namespace=pod.namespace,
        addresses=tuple(addresses),
        network=settings.network,
        tunnel_protocol=TunnelProtocol.HBONE if captured or native else TunnelProtocol.NONE,
        trust_domain="" if settings.trust_domain == DEFAULT_TRUST_DOMAIN else settings.trust_domain,
        service_account=pod.service_account,
        node=pod.node_name,
        # Without owner references the workload is the pod itself.
        canonical_name=_first_label(pod.labels, _CANONICAL_NAME_LABELS, pod.name),
        canonical_revision=_first_label(pod.labels, _CANONICAL_REVISION_LABELS, "latest"),
        workload_type=WorkloadType.POD,
        workload_name=pod.name,
        native_tunnel=native,
        services=freeze_services(
            {
                f"{s.namespace}/{service_hostname(s, settings.domain_suffix)}": _pod_service_ports(pod, s)
                for s in services
            }
        ),
        authorization_policies=tuple(policies),
        # Readiness conditions are not in the registry; a running pod counts as ready.
        status=WorkloadStatus.HEALTHY if pod.phase == "Running" else WorkloadStatus.UNHEALTHY,
        cluster_id=settings.cluster_id,
        locality=node_locality(node),
        network_mode=NetworkMode.HOST_NETWORK if pod.host_network else NetworkMode.STANDARD,
    )


def selector_policy_keys(labels: Mapping[str, str], policies: Iterable[SelectorPolicy]) -> list[str]:
    """Sorted keys of the policies whose selector matches; callers pass the pod's namespace's and the root
    namespace's selector policies."""
    plain = dict(labels)
    return sorted({p.key for p in policies if p.selector and all(plain.get(k) == v for k, v in p.selector.items())})


# --- endpoint slices ----------------------------------------------------------------------------------------


def build_endpoint_slice_workloads(
    es: EndpointSlice, svc: KubeService | None, settings: WorkloadSettings
) -> list[Workload]:
    """Workloads for endpoints of a service's slice that are not pods (pods are built from the Pod)."""
    if svc is None or svc.type == "ExternalName" or not es.service_name or es.address_type == "FQDN":
        return []
    key = f"{es.namespace}/{service_hostname(svc, settings.domain_suffix)}"
    ports: list[Port] = []
    for p in es.ports:
        if p.port is None or p.protocol != "TCP":
            continue
        # The slice names the Service port; its number is the target port.
        for sp in svc.ports:
            if sp.name == p.name:
                ports.append(Port(sp.port, p.port))
                break
    services = freeze_services({key: ports})
    out: list[Workload] = []
    seen: set[str] = set()
    for ep in es.endpoints:
        if (ep.target_ref is not None and ep.target_ref.kind == "Pod") or not ep.addresses:
            continue
        first = ep.addresses[0]
        if first in seen:
            continue
        seen.add(first)
        try:
            addresses = tuple(ipaddress.ip_address(a) for a in ep.addresses)
        except ValueError:
            continue
        out.append(
            Workload(
                uid=f"{settings.cluster_id}/discovery.k8s.io/EndpointSlice/{es.namespace}/{es.name}/{first}",
                name=es.name,
                namespace=es.namespace,
                addresses=addresses,
                network=settings.network,
                trust_domain="" if settings.trust_domain == DEFAULT_TRUST_DOMAIN else settings.trust_domain,
                services=services,
                status=WorkloadStatus.HEALTHY if ep.ready else WorkloadStatus.UNHEALTHY,
                cluster_id=settings.cluster_id,
                # Opaque endpoints may share addresses with others: never look them up by IP.
                network_mode=NetworkMode.HOST_NETWORK,
            )
        )
    return out
