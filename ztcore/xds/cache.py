"""The versioned snapshot cache: the only thing between configuration sources and xDS streams.

Resources are kept per (type URL, scope). The scope "" is shared by every client; a non-empty scope holds
per-client resources (the SDS `default` secret of one identity, say). Every change bumps a cache-wide
revision and notifies the watchers with the names that changed, so a stream can decide whether it cares.
Single-threaded by design: it is called from the event loop only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from ztcore.xds.resources import Resource

log = logging.getLogger(__name__)

GLOBAL_SCOPE = ""


@dataclass(frozen=True, slots=True)
class Change:
    type_url: str
    scope: str
    names: frozenset[str]  # added, updated or removed
    revision: int
    # time.monotonic() of the configuration change behind it (the first of a debounced batch), if known:
    # streams measure convergence from it (istiod's pilot_proxy_convergence_time)
    origin: float | None = None


Watcher = Callable[[Change], None]


class FullSet:
    """Every resource of one type in one scope at one revision, in name order, built once and shared by every
    stream that sends them all (a wildcard subscriber's first response): the name -> version map and the
    joined Delta wire entries. `versions` is a plain dict that nobody may modify."""

    __slots__ = ("_given", "_sorted", "_wire", "versions")

    def __init__(self, resources: Iterable[Resource], versions: dict[str, str] | None = None) -> None:
        self._given = tuple(resources)
        self.versions: dict[str, str] = {r.name: r.version for r in self._given} if versions is None else versions
        self._sorted: tuple[Resource, ...] | None = None
        self._wire: bytes | None = None

    def evolved(self, current: Mapping[str, Resource], changed: Iterable[str]) -> FullSet:
        """The set after `changed` names moved to what `current` holds: the versions map is copied and patched
        (a change costs its names, not a rebuild from 11,000 resources)."""
        versions = self.versions.copy()
        for name in changed:
            res = current.get(name)
            if res is None:
                versions.pop(name, None)
            else:
                versions[name] = res.version
        return FullSet(current.values(), versions)

    @property
    def resources(self) -> tuple[Resource, ...]:
        """Sorted by name, on first use: after a push, streams ask for `versions` only (their ACKs), and only
        a newly connecting client needs the ordered set."""
        if self._sorted is None:
            self._sorted = tuple(sorted(self._given, key=lambda r: r.name))
            self._given = ()
        return self._sorted

    @property
    def delta_wire(self) -> bytes:
        if self._wire is None:
            self._wire = b"".join(r.delta_wire for r in self.resources)
        return self._wire


class SnapshotCache:
    def __init__(self) -> None:
        self._data: dict[tuple[str, str], dict[str, Resource]] = {}
        # alias -> the names holding it; when several do, the one that entered the set last answers
        self._aliases: dict[tuple[str, str], dict[str, set[str]]] = {}
        self._entered: dict[tuple[str, str], dict[str, int]] = {}  # name -> when it entered the set
        self._entries = 0
        self._versions: dict[tuple[str, str], int] = {}
        self._watchers: dict[int, Watcher] = {}
        self._next_watch = 0
        self._full: dict[tuple[str, str], tuple[int, FullSet]] = {}
        # names changed since the memoised FullSet's revision: the next one is derived from it
        self._changed_since_full: dict[tuple[str, str], set[str]] = {}
        self.revision = 0

    # -- reads ---------------------------------------------------------------------------------------

    def get(self, type_url: str, name: str, scope: str = GLOBAL_SCOPE) -> Resource | None:
        """By name, or by alias when no resource has that name."""
        key = (type_url, scope)
        found = self._data.get(key, {}).get(name)
        if found is None:
            holders = self._aliases.get(key, {}).get(name)
            if holders:
                entered = self._entered[key]
                found = self._data[key].get(max(holders, key=entered.__getitem__))
        return found

    def resources(self, type_url: str, scope: str = GLOBAL_SCOPE) -> Mapping[str, Resource]:
        return MappingProxyType(self._data.get((type_url, scope), {}))

    def scopes(self) -> frozenset[str]:
        """The per-client scopes that hold resources now (the global scope is not one of them)."""
        return frozenset(scope for (_, scope), held in self._data.items() if scope and held)

    def version(self, type_url: str, scope: str = GLOBAL_SCOPE) -> int:
        """The revision of the last change to this type in this scope (0: never set)."""
        return self._versions.get((type_url, scope), 0)

    def full_set(self, type_url: str, scope: str = GLOBAL_SCOPE) -> FullSet:
        """All resources of the type in the scope, as of now; memoised until the type changes there."""
        key = (type_url, scope)
        revision = self._versions.get(key, 0)
        hit = self._full.get(key)
        if hit is not None and hit[0] == revision:
            return hit[1]
        current = self._data.get(key, {})
        since = self._changed_since_full.pop(key, None)
        full = hit[1].evolved(current, since) if hit is not None and since is not None else FullSet(current.values())
        self._full[key] = (revision, full)
        return full

    def view(self, scopes: Iterable[str]) -> CacheView:
        return CacheView(self, tuple(scopes))

    # -- writes --------------------------------------------------------------------------------------

    def set_resources(
        self, type_url: str, resources: Iterable[Resource], *, scope: str = GLOBAL_SCOPE, origin: float | None = None
    ) -> frozenset[str]:
        """Replace the whole set of a type in a scope; returns the names that changed."""
        incoming = self._checked(type_url, resources)
        current = self._data.get((type_url, scope), {})
        removed = set(current) - set(incoming)
        return self._apply(type_url, scope, incoming, removed, origin)

    def upsert(
        self, type_url: str, resources: Iterable[Resource], *, scope: str = GLOBAL_SCOPE, origin: float | None = None
    ) -> frozenset[str]:
        return self._apply(type_url, scope, self._checked(type_url, resources), set(), origin)

    def remove(
        self, type_url: str, names: Iterable[str], *, scope: str = GLOBAL_SCOPE, origin: float | None = None
    ) -> frozenset[str]:
        return self._apply(type_url, scope, {}, set(names), origin)

    def drop_scope(self, scope: str) -> None:
        """Forget every resource of a per-client scope (its last client went away)."""
        for type_url, s in [k for k in self._data if k[1] == scope]:
            self.remove(type_url, list(self._data[(type_url, s)]), scope=scope)

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher` after every change; returns the function that stops it."""
        self._next_watch += 1
        token = self._next_watch
        self._watchers[token] = watcher

        def stop() -> None:
            self._watchers.pop(token, None)

        return stop

    # -- internals -----------------------------------------------------------------------------------

    @staticmethod
    def _checked(type_url: str, resources: Iterable[Resource]) -> dict[str, Resource]:
        out: dict[str, Resource] = {}
        for res in resources:
            if res.type_url != type_url:
                raise ValueError(f"resource {res.name!r} is a {res.type_url}, not a {type_url}")
            if res.name in out:
                # Two resources of one name in a response make the client NACK; refuse before publishing.
                raise ValueError(f"duplicate {type_url} resource {res.name!r}")
            out[res.name] = res
        return out

    @staticmethod
    def _drop_aliases(aliases: dict[str, set[str]], name: str, held: Iterable[str]) -> None:
        for alias in held:
            holders = aliases.get(alias)
            if holders is not None:
                holders.discard(name)
                if not holders:
                    del aliases[alias]

    def _apply(
        self, type_url: str, scope: str, upserts: dict[str, Resource], removals: set[str], origin: float | None
    ) -> frozenset[str]:
        key = (type_url, scope)
        current = self._data.setdefault(key, {})
        aliases = self._aliases.setdefault(key, {})
        entered = self._entered.setdefault(key, {})
        changed: set[str] = set()
        for name in removals:
            old = current.pop(name, None)
            if old is not None:
                changed.add(name)
                self._drop_aliases(aliases, name, old.aliases)
                del entered[name]
        for name, res in upserts.items():
            old = current.get(name)
            if not res.same_as(old) or old is None or old.aliases != res.aliases:
                current[name] = res
                changed.add(name)
                if old is None:
                    self._entries += 1
                    entered[name] = self._entries
                elif old.aliases != res.aliases:
                    self._drop_aliases(aliases, name, old.aliases)
                if old is None or old.aliases != res.aliases:
                    for alias in res.aliases:
                        aliases.setdefault(alias, set()).add(name)
        if not changed:
            return frozenset()
        if not current:
            del self._data[key], self._aliases[key], self._entered[key]
        self.revision += 1
        self._versions[key] = self.revision
        if key in self._full:
            self._changed_since_full.setdefault(key, set()).update(changed)
        change = Change(type_url, scope, frozenset(changed), self.revision, origin)
        for watcher in list(self._watchers.values()):
            try:
                watcher(change)
            except Exception:  # one broken watcher must not stop the others from hearing the change
                log.exception("cache watcher failed on a change of %s", type_url)
        return change.names


class ResourceView(Protocol):
    """The read side a stream machine needs; `CacheView` is the real one, tests may pass their own."""

    def get(self, type_url: str, name: str) -> Resource | None: ...

    def all(self, type_url: str) -> Mapping[str, Resource]: ...

    def version(self, type_url: str) -> str: ...

    def sees(self, change: Change) -> bool: ...

    def full_set(self, type_url: str) -> FullSet | None:
        """`all(type_url)` as a shared FullSet when one scope holds it all; None otherwise."""
        ...


class CacheView:
    """What one stream sees: its own scopes first, then the shared scope."""

    def __init__(self, cache: SnapshotCache, scopes: tuple[str, ...]) -> None:
        self._cache = cache
        self.scopes = scopes if GLOBAL_SCOPE in scopes else (*scopes, GLOBAL_SCOPE)

    def get(self, type_url: str, name: str) -> Resource | None:
        for scope in self.scopes:
            found = self._cache.get(type_url, name, scope)
            if found is not None:
                return found
        return None

    def all(self, type_url: str) -> dict[str, Resource]:
        merged: dict[str, Resource] = {}
        for scope in reversed(self.scopes):
            merged.update(self._cache.resources(type_url, scope))
        return merged

    def version(self, type_url: str) -> str:
        if len(self.scopes) == 1:  # the common view (a ztunnel's): asked once per push by each of its streams
            return str(self._cache.version(type_url, self.scopes[0]))
        return str(max(self._cache.version(type_url, s) for s in self.scopes))

    def sees(self, change: Change) -> bool:
        return change.scope in self.scopes

    def full_set(self, type_url: str) -> FullSet | None:
        if len(self.scopes) == 1:
            return self._cache.full_set(type_url, self.scopes[0])
        holding = [scope for scope in self.scopes if self._cache.resources(type_url, scope)]
        if len(holding) > 1:
            return None
        return self._cache.full_set(type_url, holding[0] if holding else GLOBAL_SCOPE)
