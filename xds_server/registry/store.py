"""Registry snapshots (immutable, indexed) and the `Registry` that swaps them and wakes up watchers."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

from xds_server.registry.objects import (
    REGISTRY_KINDS,
    AuthorizationPolicy,
    EndpointSlice,
    Namespace,
    Node,
    ObjectKey,
    PeerAuthentication,
    Pod,
    RegistryObject,
    Service,
    ServiceAccount,
)
from ztcore.registry import PodDirectory, PodRef

T = TypeVar("T", bound=RegistryObject)

_TERMINAL_PHASES = ("Succeeded", "Failed")


def _normalize_ip(ip: str) -> str | None:
    try:
        return ipaddress.ip_address(ip).compressed
    except ValueError:
        return None


class RegistrySnapshot:
    """One consistent view of the registry. Never changes after construction; share it freely.

    Implements `ztcore.registry.PodDirectory`.
    """

    __slots__ = ("_by_ip", "_by_key", "_by_kind", "_by_sa_node", "_digest", "_version")

    def __init__(self, objects: Iterable[object] = (), *, version: int = 0) -> None:
        by_key: dict[ObjectKey, RegistryObject] = {}
        for obj in objects:
            if not isinstance(obj, REGISTRY_KINDS):
                raise TypeError(f"not a registry object: {type(obj).__name__}")
            if obj.key in by_key:
                raise ValueError(f"duplicate object {obj.key}")  # the parser reports these as ConfigErrors
            by_key[obj.key] = obj
        ordered = sorted(by_key.values(), key=lambda o: o.key)
        by_kind: dict[str, list[RegistryObject]] = defaultdict(list)
        by_ip: dict[str, list[Pod]] = defaultdict(list)
        by_sa_node: dict[tuple[str, str, str], list[Pod]] = defaultdict(list)
        for obj in ordered:
            by_kind[obj.kind].append(obj)
            if isinstance(obj, Pod):
                by_sa_node[(obj.namespace, obj.service_account, obj.node_name)].append(obj)
                for ip in obj.pod_ips:
                    by_ip[_normalize_ip(ip) or ip].append(obj)
        self._version = version
        self._by_key = by_key
        self._by_kind = {kind: tuple(objs) for kind, objs in by_kind.items()}
        # Several pods can carry one IP (host-network pods, finished pods); the live pod-network one wins.
        self._by_ip = {ip: tuple(sorted(pods, key=_ip_preference)) for ip, pods in by_ip.items()}
        self._by_sa_node = {k: tuple(v) for k, v in by_sa_node.items()}
        self._digest = _digest(ordered)

    @property
    def version(self) -> int:
        """Increases by one with every content change made through `Registry.replace`."""
        return self._version

    @property
    def digest(self) -> str:
        """sha256 of the content; equal digests mean equal objects, whatever the version or file order."""
        return self._digest

    def __len__(self) -> int:
        return len(self._by_key)

    def __repr__(self) -> str:
        return f"RegistrySnapshot(version={self._version}, objects={len(self)}, digest={self._digest[:12]})"

    # --- generic access ------------------------------------------------------------------------------------

    def objects(self) -> tuple[RegistryObject, ...]:
        return tuple(sorted(self._by_key.values(), key=lambda o: o.key))

    def get(self, cls: type[T], namespace: str, name: str) -> T | None:
        """The object of this kind, or None; use namespace "" for Namespace and Node."""
        obj = self._by_key.get((cls.kind, namespace, name))
        return obj if isinstance(obj, cls) else None

    def _all(self, cls: type[T]) -> tuple[T, ...]:
        return tuple(o for o in self._by_kind.get(cls.kind, ()) if isinstance(o, cls))

    # --- per kind (sorted by namespace, name) ------------------------------------------------------------

    def pods(self) -> tuple[Pod, ...]:
        return self._all(Pod)

    def services(self) -> tuple[Service, ...]:
        return self._all(Service)

    def nodes(self) -> tuple[Node, ...]:
        return self._all(Node)

    def namespaces(self) -> tuple[Namespace, ...]:
        return self._all(Namespace)

    def service_accounts(self) -> tuple[ServiceAccount, ...]:
        return self._all(ServiceAccount)

    def endpoint_slices(self) -> tuple[EndpointSlice, ...]:
        return self._all(EndpointSlice)

    def authorization_policies(self) -> tuple[AuthorizationPolicy, ...]:
        return self._all(AuthorizationPolicy)

    def peer_authentications(self) -> tuple[PeerAuthentication, ...]:
        return self._all(PeerAuthentication)

    def namespace(self, name: str) -> Namespace | None:
        return self.get(Namespace, "", name)

    def pod(self, namespace: str, name: str) -> Pod | None:
        """The pod whatever its phase (get_pod hides Failed pods)."""
        return self.get(Pod, namespace, name)

    def pod_by_ip(self, ip: str) -> Pod | None:
        """The pod that owns this IP: a running pod-network pod before host-network or finished ones."""
        pods = self.pods_by_ip(ip)
        return pods[0] if pods else None

    def pods_by_ip(self, ip: str) -> tuple[Pod, ...]:
        key = _normalize_ip(ip)
        return self._by_ip.get(key, ()) if key is not None else ()

    def pods_by_account_on_node(self, namespace: str, service_account: str, node: str) -> tuple[Pod, ...]:
        return self._by_sa_node.get((namespace, service_account, node), ())

    # --- ztcore.registry.PodDirectory -----------------------------------------------------------------------

    def get_pod(self, namespace: str, name: str) -> PodRef | None:
        pod = self.pod(namespace, name)
        # As istiod's informer: a Failed pod no longer exists for the CA.
        if pod is None or pod.phase == "Failed":
            return None
        return pod.to_ref()

    def count_pods_on_node(self, namespace: str, service_account: str, node_name: str) -> int:
        pods = self.pods_by_account_on_node(namespace, service_account, node_name)
        return sum(1 for p in pods if p.phase != "Failed")

    def has_node(self, name: str) -> bool:
        return self.get(Node, "", name) is not None


def _implements_pod_directory(snapshot: RegistrySnapshot) -> PodDirectory:
    return snapshot  # mypy fails here if RegistrySnapshot drifts from the protocol


def _ip_preference(pod: Pod) -> tuple[bool, bool, ObjectKey]:
    return (pod.phase in _TERMINAL_PHASES, pod.host_network, pod.key)


def _digest(ordered: Iterable[RegistryObject]) -> str:
    # repr() of the frozen dataclasses is complete and deterministic (FrozenMap sorts its keys).
    h = hashlib.sha256()
    for obj in ordered:
        h.update(repr(obj).encode())
        h.update(b"\n")
    return h.hexdigest()


class Registry:
    """Holds the current snapshot and tells watchers when it changes.

    Use from the event loop thread only (asyncio.Event is not thread-safe).
    """

    def __init__(self, objects: Iterable[object] = ()) -> None:
        self._snapshot = RegistrySnapshot(objects, version=0)
        self._changed = asyncio.Event()

    @property
    def current(self) -> RegistrySnapshot:
        return self._snapshot

    def replace(self, objects: Iterable[object]) -> RegistrySnapshot:
        """Install a new snapshot and wake watchers; identical content keeps the current one (no push)."""
        candidate = RegistrySnapshot(objects, version=self._snapshot.version + 1)
        if candidate.digest == self._snapshot.digest:
            return self._snapshot
        self._snapshot = candidate
        # Waiters hold the old event; a fresh one is armed for the next change.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return candidate

    # PodDirectory over whatever snapshot is current, so the CA's node authorizer always sees the latest.
    def get_pod(self, namespace: str, name: str) -> PodRef | None:
        return self._snapshot.get_pod(namespace, name)

    def count_pods_on_node(self, namespace: str, service_account: str, node_name: str) -> int:
        return self._snapshot.count_pods_on_node(namespace, service_account, node_name)

    def has_node(self, name: str) -> bool:
        return self._snapshot.has_node(name)

    async def wait_for_change(self, after_version: int) -> RegistrySnapshot:
        """The current snapshot as soon as its version is greater than after_version."""
        while self._snapshot.version <= after_version:
            await self._changed.wait()
        return self._snapshot

    async def watch(self, after_version: int = -1) -> AsyncIterator[RegistrySnapshot]:
        """Each newer snapshot; intermediate ones are skipped if the consumer is slower than the changes."""
        version = after_version
        while True:
            snapshot = await self.wait_for_change(version)
            version = snapshot.version
            yield snapshot
