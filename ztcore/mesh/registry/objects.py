"""Immutable model of the Kubernetes and Istio objects the registry reads.

Only the fields ztd uses are kept. Every object is a frozen, slotted dataclass built from tuples and
`FrozenMap`s, so a snapshot can be shared between tasks without copying or locking.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeAlias, TypeVar

from ztcore.registry import PodRef

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """A read-only, hashable mapping (labels, selectors, port-level modes).

    MappingProxyType would be read-only too, but it is not hashable, and frozen dataclasses should be.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(data)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        # Sorted so that repr() (and so the snapshot digest) does not depend on YAML key order.
        items = sorted(self._data.items(), key=lambda kv: repr(kv[0]))
        return "FrozenMap({" + ", ".join(f"{k!r}: {v!r}" for k, v in items) + "})"


Labels: TypeAlias = FrozenMap[str, str]
EMPTY_LABELS: Labels = FrozenMap()
_NO_PORTS: FrozenMap[int, str] = FrozenMap()

# A (kind, namespace, name) triple; cluster-scoped objects have namespace "".
ObjectKey: TypeAlias = tuple[str, str, str]


def default_uid(kind: str, namespace: str, name: str) -> str:
    """The uid of an object whose YAML has no metadata.uid.

    Deterministic, so a restart (or `ztctl` minting a token offline) agrees with the running daemon.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"ztdpu://{kind}/{namespace}/{name}"))


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    name: str
    namespace: str = ""
    uid: str = ""
    labels: Labels = EMPTY_LABELS
    annotations: Labels = EMPTY_LABELS


class _Object:
    """Shared accessors; subclasses are frozen dataclasses with a `meta` field."""

    __slots__ = ()
    kind: ClassVar[str]
    api_group: ClassVar[str]  # "" for the core group
    namespaced: ClassVar[bool] = True
    meta: ObjectMeta  # declared here for the accessors; each dataclass defines the field

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def uid(self) -> str:
        return self.meta.uid

    @property
    def labels(self) -> Labels:
        return self.meta.labels

    @property
    def key(self) -> ObjectKey:
        return (self.kind, self.meta.namespace, self.meta.name)


# --- core/v1 ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Namespace(_Object):
    kind: ClassVar[str] = "Namespace"
    api_group: ClassVar[str] = ""
    namespaced: ClassVar[bool] = False
    meta: ObjectMeta


@dataclass(frozen=True, slots=True)
class ServiceAccount(_Object):
    kind: ClassVar[str] = "ServiceAccount"
    api_group: ClassVar[str] = ""
    meta: ObjectMeta


@dataclass(frozen=True, slots=True)
class NodeAddress:
    type: str  # InternalIP, ExternalIP, Hostname, ...
    address: str


@dataclass(frozen=True, slots=True)
class Node(_Object):
    kind: ClassVar[str] = "Node"
    api_group: ClassVar[str] = ""
    namespaced: ClassVar[bool] = False
    meta: ObjectMeta
    addresses: tuple[NodeAddress, ...] = ()

    @property
    def internal_ips(self) -> tuple[str, ...]:
        return tuple(a.address for a in self.addresses if a.type == "InternalIP")


@dataclass(frozen=True, slots=True)
class ContainerPort:
    container_port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Pod(_Object):
    kind: ClassVar[str] = "Pod"
    api_group: ClassVar[str] = ""
    meta: ObjectMeta
    service_account: str = "default"
    node_name: str = ""
    pod_ips: tuple[str, ...] = ()
    phase: str = "Running"
    host_network: bool = False
    container_ports: tuple[ContainerPort, ...] = ()

    def to_ref(self) -> PodRef:
        m = self.meta
        return PodRef(m.namespace, m.name, m.uid, self.service_account, self.node_name, self.phase)


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int | str  # a number, or the name of a container port
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class Service(_Object):
    kind: ClassVar[str] = "Service"
    api_group: ClassVar[str] = ""
    meta: ObjectMeta
    # Empty means "no selector": Kubernetes then selects no pods (endpoints are managed by hand).
    selector: Labels = EMPTY_LABELS
    cluster_ips: tuple[str, ...] = ()  # headless ("None") services have none
    ports: tuple[ServicePort, ...] = ()
    type: str = "ClusterIP"
    # spec.ipFamilies ("IPv4", "IPv6"), defaulted as an IPv4 single-stack API server does when a file omits it
    ip_families: tuple[str, ...] = ()

    def hostname(self, domain_suffix: str = "cluster.local") -> str:
        return f"{self.meta.name}.{self.meta.namespace}.svc.{domain_suffix}"


# --- discovery.k8s.io/v1 --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectReference:
    kind: str
    name: str
    namespace: str = ""
    uid: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[str, ...]
    target_ref: ObjectReference | None = None
    node_name: str = ""
    ready: bool = True  # conditions.ready; Kubernetes says to treat "unknown" as ready


@dataclass(frozen=True, slots=True)
class EndpointPort:
    port: int | None = None  # None: all ports
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointSlice(_Object):
    kind: ClassVar[str] = "EndpointSlice"
    api_group: ClassVar[str] = "discovery.k8s.io"
    meta: ObjectMeta
    address_type: str
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()

    @property
    def service_name(self) -> str:
        """The owning Service (label kubernetes.io/service-name), or ""."""
        return self.meta.labels.get("kubernetes.io/service-name", "")


# --- security.istio.io/v1 (and v1beta1) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    trust_domains: tuple[str, ...] = ()
    not_trust_domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()  # strings in the Istio API; validated and converted here
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    # `from: [{source: ...}]` / `to: [{operation: ...}]` with the one-field wrappers removed.
    from_: tuple[Source, ...] = ()
    to: tuple[Operation, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyTargetReference:
    kind: str
    name: str
    group: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy(_Object):
    kind: ClassVar[str] = "AuthorizationPolicy"
    api_group: ClassVar[str] = "security.istio.io"
    meta: ObjectMeta
    # None: no selector (namespace-wide, or mesh-wide in the root namespace). Not the same as {}.
    selector: Labels | None = None
    action: str = "ALLOW"  # ALLOW, DENY, AUDIT, CUSTOM
    # () is `spec: {}` (an ALLOW policy that allows nothing); (Rule(),) is `rules: [{}]` (allow all).
    rules: tuple[Rule, ...] = ()
    target_refs: tuple[PolicyTargetReference, ...] = ()  # targetRef and targetRefs merged
    provider: str | None = None  # provider.name, CUSTOM only

    @property
    def has_target_ref(self) -> bool:
        return bool(self.target_refs)


@dataclass(frozen=True, slots=True)
class PeerAuthentication(_Object):
    kind: ClassVar[str] = "PeerAuthentication"
    api_group: ClassVar[str] = "security.istio.io"
    meta: ObjectMeta
    selector: Labels | None = None
    mtls_mode: str = "UNSET"  # UNSET, DISABLE, PERMISSIVE, STRICT; UNSET inherits
    port_level_mtls: FrozenMap[int, str] = _NO_PORTS  # container port -> mode


RegistryObject: TypeAlias = (
    Namespace | ServiceAccount | Node | Pod | Service | EndpointSlice | AuthorizationPolicy | PeerAuthentication
)

REGISTRY_KINDS: tuple[type[RegistryObject], ...] = (
    Namespace,
    ServiceAccount,
    Node,
    Pod,
    Service,
    EndpointSlice,
    AuthorizationPolicy,
    PeerAuthentication,
)
