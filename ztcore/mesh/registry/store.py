"""Registry snapshots (immutable, indexed) and the `Registry` that swaps them and wakes up watchers."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

from ztcore.mesh.registry.objects import (
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

    `evolve` makes the next snapshot from this one at a cost proportional to what changed: the maps are copied
    (a pointer copy per object), the indexes touched only for the changed objects, and the per-kind sorted
    views and the digest built only when someone asks for them. Implements `ztcore.registry.PodDirectory`.
    """

    __slots__ = ("_by_ip", "_by_key", "_by_kind", "_by_sa_node", "_digest", "_sorted", "_version")

    def __init__(self, objects: Iterable[object] = (), *, version: int = 0) -> None:
        by_key: dict[ObjectKey, RegistryObject] = {}
        for obj in objects:
            if not isinstance(obj, REGISTRY_KINDS):
                raise TypeError(f"not a registry object: {type(obj).__name__}")
            if obj.key in by_key:
                raise ValueError(f"duplicate object {obj.key}")  # the parser reports these as ConfigErrors
            by_key[obj.key] = obj
        by_kind: dict[str, dict[ObjectKey, RegistryObject]] = defaultdict(dict)
        by_ip: dict[str, list[Pod]] = defaultdict(list)
        by_sa_node: dict[tuple[str, str, str], list[Pod]] = defaultdict(list)
        for obj in by_key.values():
            by_kind[obj.kind][obj.key] = obj
            if isinstance(obj, Pod):
                by_sa_node[_sa_node(obj)].append(obj)
                for ip in _ips(obj):
                    by_ip[ip].append(obj)
        self._version = version
        self._by_key = by_key
        self._by_kind = dict(by_kind)
        # Several pods can carry one IP (host-network pods, finished pods); the live pod-network one wins.
        self._by_ip = {ip: tuple(sorted(pods, key=_ip_preference)) for ip, pods in by_ip.items()}
        self._by_sa_node = {k: tuple(sorted(v, key=_key)) for k, v in by_sa_node.items()}
        self._sorted: dict[str, tuple[RegistryObject, ...]] = {}
        self._digest: str | None = None

    def evolve(
        self, upserts: Iterable[RegistryObject], removals: Iterable[ObjectKey], *, version: int
    ) -> tuple[RegistrySnapshot, frozenset[ObjectKey]]:
        """The snapshot with these objects added or replaced and these keys gone, and the keys whose content
        really changed (an upsert equal to the current object is no change). No change: this snapshot."""
        changed: dict[ObjectKey, RegistryObject | None] = {}
        for key in removals:
            if key in self._by_key:
                changed[key] = None
        for obj in upserts:
            if not isinstance(obj, REGISTRY_KINDS):
                raise TypeError(f"not a registry object: {type(obj).__name__}")
            key = obj.key
            changed.pop(key, None)
            if self._by_key.get(key) != obj:
                changed[key] = obj
        if not changed:
            return self, frozenset()
        nxt = RegistrySnapshot.__new__(RegistrySnapshot)
        nxt._version = version
        nxt._by_key = dict(self._by_key)
        nxt._by_kind = dict(self._by_kind)
        nxt._by_ip = self._by_ip
        nxt._by_sa_node = self._by_sa_node
        kinds = {key[0] for key in changed}
        nxt._sorted = {k: v for k, v in self._sorted.items() if k not in kinds}
        nxt._digest = None
        copied_kinds: set[str] = set()
        pods_touched = False
        for key, new in changed.items():
            kind = key[0]
            if kind not in copied_kinds:
                nxt._by_kind[kind] = dict(nxt._by_kind.get(kind, {}))
                copied_kinds.add(kind)
            old = nxt._by_key.get(key)
            if isinstance(old, Pod) or isinstance(new, Pod):
                if not pods_touched:
                    nxt._by_ip, nxt._by_sa_node = dict(nxt._by_ip), dict(nxt._by_sa_node)
                    pods_touched = True
                nxt._reindex_pod(old if isinstance(old, Pod) else None, new if isinstance(new, Pod) else None)
            if new is None:
                del nxt._by_key[key]
                del nxt._by_kind[kind][key]
            else:
                nxt._by_key[key] = new
                nxt._by_kind[kind][key] = new
        return nxt, frozenset(changed)

    def _reindex_pod(self, old: Pod | None, new: Pod | None) -> None:
        if old is not None:
            for ip in _ips(old):
                left = tuple(p for p in self._by_ip.get(ip, ()) if p.key != old.key)
                if left:
                    self._by_ip[ip] = left
                else:
                    self._by_ip.pop(ip, None)
            rest = tuple(p for p in self._by_sa_node.get(_sa_node(old), ()) if p.key != old.key)
            if rest:
                self._by_sa_node[_sa_node(old)] = rest
            else:
                self._by_sa_node.pop(_sa_node(old), None)
        if new is not None:
            for ip in _ips(new):
                self._by_ip[ip] = tuple(sorted((*self._by_ip.get(ip, ()), new), key=_ip_preference))
            group = _sa_node(new)
            self._by_sa_node[group] = tuple(sorted((*self._by_sa_node.get(group, ()), new), key=_key))

    @property
    def version(self) -> int:
        """Increases by one with every content change made through `Registry.replace` or `Registry.apply`."""
        return self._version

    @property
    def digest(self) -> str:
        """sha256 of the content; equal digests mean equal objects, whatever the version or file order.
        Computed when asked for (it reads every object)."""
        if self._digest is None:
            self._digest = _digest(self.objects())
        return self._digest

    def __len__(self) -> int:
        return len(self._by_key)

    def __repr__(self) -> str:
        return f"RegistrySnapshot(version={self._version}, objects={len(self)})"

    # --- generic access ------------------------------------------------------------------------------------

    def objects(self) -> tuple[RegistryObject, ...]:
        return tuple(sorted(self._by_key.values(), key=_key))

    def keys(self) -> frozenset[ObjectKey]:
        return frozenset(self._by_key)

    def unordered(self) -> Iterable[RegistryObject]:
        """Every object, in no particular order (objects() sorts them)."""
        return self._by_key.values()

    def get(self, cls: type[T], namespace: str, name: str) -> T | None:
        """The object of this kind, or None; use namespace "" for Namespace and Node."""
        obj = self._by_key.get((cls.kind, namespace, name))
        return obj if isinstance(obj, cls) else None

    def get_key(self, key: ObjectKey) -> RegistryObject | None:
        return self._by_key.get(key)

    def _all(self, cls: type[T]) -> tuple[T, ...]:
        found = self._sorted.get(cls.kind)
        if found is None:
            found = tuple(sorted(self._by_kind.get(cls.kind, {}).values(), key=_key))
            self._sorted[cls.kind] = found
        return tuple(o for o in found if isinstance(o, cls))

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


def _key(obj: RegistryObject) -> ObjectKey:
    return obj.key


def _ips(pod: Pod) -> list[str]:
    return [_normalize_ip(ip) or ip for ip in pod.pod_ips]


def _sa_node(pod: Pod) -> tuple[str, str, str]:
    return (pod.namespace, pod.service_account, pod.node_name)


def _digest(ordered: Iterable[RegistryObject]) -> str:
    # repr() of the frozen dataclasses is complete and deterministic (FrozenMap sorts its keys).
    h = hashlib.sha256()
    for obj in ordered:
        h.update(repr(obj).encode())
        h.update(b"\n")
    return h.hexdigest()


class Registry:
    """Holds the current snapshot and tells watchers when it changes, and which objects changed.

    Use from the event loop thread only (asyncio.Event is not thread-safe).
    """

    HISTORY = 1024  # versions whose changed keys are kept for `changes_since`

    def __init__(self, objects: Iterable[object] = ()) -> None:
        self._snapshot = RegistrySnapshot(objects, version=0)
        self._changed = asyncio.Event()
        self._history: deque[tuple[int, frozenset[ObjectKey]]] = deque(maxlen=self.HISTORY)

    @property
    def current(self) -> RegistrySnapshot:
        return self._snapshot

    def replace(self, objects: Iterable[object]) -> RegistrySnapshot:
        """Install exactly these objects and wake watchers; identical content keeps the current one (no push)."""
        incoming = RegistrySnapshot(objects)  # validates (kinds, duplicates)
        removals = self._snapshot.keys() - incoming.keys()
        return self.apply(incoming.unordered(), removals)

    def apply(self, upserts: Iterable[RegistryObject], removals: Iterable[ObjectKey] = ()) -> RegistrySnapshot:
        """Add or replace these objects and remove these keys, at a cost proportional to the change."""
        nxt, changed = self._snapshot.evolve(upserts, removals, version=self._snapshot.version + 1)
        if not changed:
            return self._snapshot
        self._snapshot = nxt
        self._history.append((nxt.version, changed))
        # Waiters hold the old event; a fresh one is armed for the next change.
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        return nxt

    def changes_since(self, version: int) -> frozenset[ObjectKey] | None:
        """The keys changed after `version` up to the current one; None when that history is gone."""
        if version == self._snapshot.version:
            return frozenset()
        if not self._history or self._history[0][0] > version + 1:
            return None
        out: set[ObjectKey] = set()
        for v, keys in self._history:
            if v > version:
                out |= keys
        return frozenset(out)

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
