"""The bridge's view of the mesh: workloads (ours and the other nodes'), bridges' node addresses, L4 policies.

One store, fed by two sources through the same entry points (ztunnel's lesson: its LocalClient and its xDS
client share one updater): `ipsec_bridge.local_source` (a folder of Kubernetes YAML, translated exactly as ztd
translates it) replaces the whole content; `ipsec_bridge.xds_client` applies Delta ADS responses through
`StateStore.handlers()`. Protos become model objects here, at the edge; readers get an immutable `NodeView`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from types import MappingProxyType
from typing import Any

from google.protobuf import any_pb2

from ipsec_bridge.vfmap import Assignment, VfMap, assign
from protos.istio.security import authorization_pb2
from protos.istio.workload import workload_pb2
from ztcore.identity import Identity
from ztcore.model.authz import Authorization
from ztcore.model.workload import NetworkMode, Workload
from ztcore.rbac import PolicyIndex
from ztcore.xds import typeurls

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class ViewSettings:
    mesh_cidrs: tuple[IPNetwork, ...]
    trust_domain: str = "cluster.local"
    # The account bridges run as: their host-network pods give each node's underlay address.
    bridge_namespace: str = "istio-system"
    bridge_service_account: str = "ztunnel"

    @classmethod
    def parse(cls, mesh_cidrs: Sequence[str], trust_domain: str, bridge_account: str) -> ViewSettings:
        """ValueError with a readable message for a bad CIDR or account."""
        if not mesh_cidrs:
            raise ValueError("--mesh-cidr is required: the pod range whose traffic must be encrypted")
        nets: list[IPNetwork] = []
        for text in mesh_cidrs:
            try:
                nets.append(ip_network(text, strict=True))
            except ValueError as err:
                raise ValueError(f"--mesh-cidr {text!r}: {err}") from None
        ns, sep, sa = bridge_account.partition("/")
        if not sep or not ns or not sa or "/" in sa:
            raise ValueError(f"--bridge-account {bridge_account!r} is not NAMESPACE/SERVICEACCOUNT")
        return cls(tuple(nets), trust_domain, ns, sa)

    def in_mesh(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.mesh_cidrs)

    @property
    def bridge_identity(self) -> Identity:
        return Identity.for_account(self.trust_domain, self.bridge_namespace, self.bridge_service_account)


@dataclass(frozen=True, slots=True)
class MeshPod:
    """A workload the bridge tunnels for: a pod-network workload with an address inside the mesh CIDR."""

    workload: Workload
    ip: IPAddress
    identity: Identity
    vf: int | None = None  # its VF on this node, when a VF map is configured (ipsec_bridge.vfmap)

    @property
    def node(self) -> str:
        return self.workload.node

    @property
    def name(self) -> str:
        return f"{self.workload.namespace}/{self.workload.name}"


@dataclass(frozen=True, slots=True)
class NodeView:
    """An immutable snapshot; every lookup the pair and handshake logic needs."""

    version: int
    settings: ViewSettings
    workloads: tuple[Workload, ...]
    authorizations: tuple[Authorization, ...]
    policies: PolicyIndex
    pods_by_ip: Mapping[IPAddress, MeshPod]
    # addresses claimed by more than one mesh workload: no tunnel for any of them
    conflicts: Mapping[IPAddress, tuple[str, ...]]
    node_addresses: Mapping[str, IPAddress]
    synced: bool = True
    received_at: float = 0.0  # the store's monotonic clock when it published it (latency measurements only)
    # --vf-map: this node's pods under the map (those refused are left out of pods_by_ip); None without one
    vf: Assignment | None = None
    # Moves whenever what every pair's admission depends on besides its two pods changes (policies, node
    # addresses, address conflicts): a pair decided under the same rules_version and the same two workload
    # objects is decided the same way again (on-demand reconcile re-checks only the others).
    rules_version: int = 0

    def pod(self, ip: IPAddress) -> MeshPod | None:
        return self.pods_by_ip.get(ip)

    def pods_on(self, node: str) -> list[MeshPod]:
        return sorted((p for p in self.pods_by_ip.values() if p.node == node), key=lambda p: p.ip)

    def pods_not_on(self, node: str) -> list[MeshPod]:
        return sorted((p for p in self.pods_by_ip.values() if p.node and p.node != node), key=lambda p: p.ip)

    def node_address(self, node: str) -> IPAddress | None:
        return self.node_addresses.get(node)


def build_view(
    workloads: Iterable[Workload],
    authorizations: Iterable[Authorization],
    settings: ViewSettings,
    version: int,
    *,
    synced: bool = True,
    received_at: float = 0.0,
    node: str = "",
    vf_map: VfMap | None = None,
) -> NodeView:
    """Pure: index the workloads by mesh address and find each node's bridge address.

    With `vf_map`, the pods of `node` keep their place only when the map gives them their one VF."""
    ordered = tuple(sorted(workloads, key=lambda w: w.uid))
    claims: dict[IPAddress, list[Workload]] = {}
    node_addresses: dict[str, IPAddress] = {}
    for w in ordered:
        if (
            w.network_mode is NetworkMode.HOST_NETWORK
            and w.namespace == settings.bridge_namespace
            and (w.service_account or "default") == settings.bridge_service_account
            and w.node
            and w.addresses
        ):
            node_addresses.setdefault(w.node, w.addresses[0])
            continue
        if w.network_mode is not NetworkMode.STANDARD:
            continue
        for ip in w.addresses:
            if settings.in_mesh(ip):
                claims.setdefault(ip, []).append(w)
    pods: dict[IPAddress, MeshPod] = {}
    conflicts: dict[IPAddress, tuple[str, ...]] = {}
    identities: dict[Identity, Identity] = {}  # one object per service account, not one per pod
    for ip, owners in claims.items():
        if len(owners) > 1:
            conflicts[ip] = tuple(f"{w.namespace}/{w.name}" for w in owners)
            continue
        owner = owners[0]
        identity = owner.identity(settings.trust_domain)
        pods[ip] = MeshPod(owner, ip, identities.setdefault(identity, identity))
    assignment = None
    if vf_map is not None:
        assignment = assign(vf_map, [(p.name, p.ip) for p in pods.values() if p.node == node])
        for ip, verdict in assignment.verdicts.items():
            if verdict.entry is None:
                del pods[ip]  # no VF, no identity on this node: no certificate, no tunnel, no bypass
            else:
                pods[ip] = MeshPod(pods[ip].workload, ip, pods[ip].identity, verdict.entry.vf)
    auths = tuple(sorted(authorizations, key=lambda a: a.key))
    return NodeView(
        version=version,
        settings=settings,
        workloads=ordered,
        authorizations=auths,
        policies=PolicyIndex(auths),
        pods_by_ip=MappingProxyType(pods),
        conflicts=MappingProxyType(conflicts),
        node_addresses=MappingProxyType(node_addresses),
        synced=synced,
        received_at=received_at,
        vf=assignment,
    )


# --- the store -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejected:
    name: str
    reason: str


class TypeHandler:
    """Applies one xDS type's resources to the store; returns what it rejected (the client NACKs those)."""

    def __init__(self, store: StateStore, type_url: str) -> None:
        self.store = store
        self.type_url = type_url

    def apply(self, upserts: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]) -> list[Rejected]:
        return self.store.apply_resources(self.type_url, upserts, removed)


@dataclass(slots=True)
class _Content:
    workloads: dict[str, Workload] = field(default_factory=dict)
    authorizations: dict[str, Authorization] = field(default_factory=dict)


class StateStore:
    """The one updater. `replace` (file source) and `apply_resources` (xDS) both end in a new NodeView."""

    def __init__(self, settings: ViewSettings, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._monotonic = monotonic  # the tunnels' clock: removal latency is measured from received_at on it
        self._content = _Content()
        self._version = 0
        self._view = build_view((), (), settings, 0, synced=False)
        self._changed = asyncio.Event()
        self._synced_types: set[str] = set()
        self._sync_needed: frozenset[str] = frozenset()
        self._node = ""
        self._vf_map: VfMap | None = None

    @property
    def view(self) -> NodeView:
        return self._view

    def replace(self, workloads: Iterable[Workload], authorizations: Iterable[Authorization]) -> NodeView:
        self._content = _Content(
            {w.uid: w for w in workloads},
            {a.key: a for a in authorizations},
        )
        return self._publish(synced=True)

    def set_vf_map(self, node: str, vf_map: VfMap | None) -> NodeView:
        """--vf-map: judge `node`'s pods by this map from now on (a new view, even before the first sync)."""
        self._node, self._vf_map = node, vf_map
        return self._publish(synced=self._view.synced)

    def expect_types(self, type_urls: Iterable[str]) -> None:
        """xDS mode: the view counts as synced once every one of these types has answered once."""
        self._sync_needed = frozenset(type_urls)

    def handlers(self) -> dict[str, TypeHandler]:
        return {t: TypeHandler(self, t) for t in (typeurls.ADDRESS, typeurls.AUTHORIZATION)}

    def apply_resources(
        self, type_url: str, upserts: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]
    ) -> list[Rejected]:
        rejected: list[Rejected] = []
        if type_url == typeurls.ADDRESS:
            for name, packed in upserts:
                try:
                    workload = _decode_address(packed)
                except ValueError as err:
                    rejected.append(Rejected(name, str(err)))
                    continue
                if workload is None:
                    self._content.workloads.pop(name, None)  # a Service: not ours to track
                else:
                    self._content.workloads[name] = workload
            for name in removed:
                self._content.workloads.pop(name, None)
        elif type_url == typeurls.AUTHORIZATION:
            for name, packed in upserts:
                try:
                    auth = _decode_authorization(packed)
                except ValueError as err:
                    rejected.append(Rejected(name, str(err)))
                    continue
                self._content.authorizations[name] = auth
            for name in removed:
                self._content.authorizations.pop(name, None)
        else:
            return [Rejected(name, f"type {type_url} is not handled by the bridge") for name, _ in upserts]
        self._synced_types.add(type_url)
        self._publish(synced=self._sync_needed <= self._synced_types)
        return rejected

    def _publish(self, *, synced: bool) -> NodeView:
        self._version += 1
        old = self._view
        view = build_view(
            self._content.workloads.values(),
            self._content.authorizations.values(),
            self.settings,
            self._version,
            synced=synced,
            received_at=self._monotonic(),
            node=self._node,
            vf_map=self._vf_map,
        )
        same_rules = (
            view.authorizations == old.authorizations
            and view.node_addresses == old.node_addresses
            and view.conflicts == old.conflicts
        )
        self._view = replace(view, rules_version=old.rules_version + (0 if same_rules else 1))
        self._notify()
        return self._view

    def _notify(self) -> None:
        # waiters hold the old event; a fresh one is armed for the next change (as xds_server's Registry)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_changed(self, after_version: int, wait_s: float | None = None) -> NodeView:
        """The view once its version is past `after_version` (or the current one after `wait_s`)."""
        if self._view.version <= after_version:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=wait_s)
        return self._view


def _decode_address(packed: any_pb2.Any) -> Workload | None:
    msg = workload_pb2.Address()
    if packed.type_url not in (typeurls.ADDRESS, typeurls.WORKLOAD):
        raise ValueError(f"resource is a {packed.type_url}, not an istio.workload.Address")
    if packed.type_url == typeurls.WORKLOAD:
        inner = workload_pb2.Workload()
        if not packed.Unpack(inner):
            raise ValueError("cannot decode istio.workload.Workload")
        return Workload.from_pb(inner)
    if not packed.Unpack(msg):
        raise ValueError("cannot decode istio.workload.Address")
    which = msg.WhichOneof("type")
    if which == "workload":
        return Workload.from_pb(msg.workload)
    if which == "service":
        return None
    raise ValueError("Address carries neither a workload nor a service")


def _decode_authorization(packed: any_pb2.Any) -> Authorization:
    msg = authorization_pb2.Authorization()
    if packed.type_url != typeurls.AUTHORIZATION or not packed.Unpack(msg):
        raise ValueError(f"resource is a {packed.type_url}, not an istio.security.Authorization")
    return Authorization.from_pb(msg)


__all__ = [
    "MeshPod",
    "NodeView",
    "Rejected",
    "StateStore",
    "ViewSettings",
    "build_view",
]


def describe(view: NodeView) -> dict[str, Any]:
    """A small summary for /config_dump."""
    return {
        "version": view.version,
        "synced": view.synced,
        "workloads": len(view.workloads),
        "mesh_pods": len(view.pods_by_ip),
        "policies": len(view.authorizations),
        "node_addresses": {k: str(v) for k, v in sorted(view.node_addresses.items())},
        "conflicting_addresses": {str(k): list(v) for k, v in sorted(view.conflicts.items())},
        **({"vf": view.vf.describe()} if view.vf is not None else {}),
    }
