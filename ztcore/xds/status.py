"""Per-stream, per-type sync state: what was sent, what the client acknowledged, its last rejection."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

SYNCED = "SYNCED"
STALE = "STALE"
NOT_SENT = "NOT SENT"
ERROR = "ERROR"

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class WatchState:
    """One type URL on one stream. Immutable: each protocol event produces a new state."""

    type_url: str
    names: frozenset[str] = frozenset()  # explicit subscriptions (names or aliases)
    wildcard: bool = False
    explicit: bool = False  # Delta: has the client ever named a resource (legacy-wildcard rule)
    nonce_sent: str = ""
    nonce_acked: str = ""
    version_sent: str = ""
    version_acked: str = ""
    last_error: str = ""
    last_sent: dt.datetime | None = None
    last_acked: dt.datetime | None = None
    last_nacked: dt.datetime | None = None
    always_respond: bool = False  # answer the next ACK too (Istio's warming rule)
    # Resource versions the client holds or has been sent (name -> version)…
    sent: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    # …and those it accepted: after a NACK this still names the last good versions.
    acked: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    # Versions in the response that is waiting for an ACK.
    pending: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    pending_removed: frozenset[str] = frozenset()

    @property
    def status(self) -> str:
        """Istio's proxy-status cell (pilot/pkg/xds/statusgen.go debugSyncStatus)."""
        if self.last_error:
            return ERROR
        if not self.nonce_sent:
            return NOT_SENT
        if self.nonce_acked == self.nonce_sent:
            return SYNCED
        return STALE

    def as_dict(self) -> dict[str, object]:
        return {
            "type_url": self.type_url,
            "status": self.status,
            "wildcard": self.wildcard,
            "names": sorted(self.names),
            "nonce_sent": self.nonce_sent,
            "nonce_acked": self.nonce_acked,
            "version_sent": self.version_sent,
            "version_acked": self.version_acked,
            "last_error": self.last_error,
            "last_sent": self.last_sent.isoformat() if self.last_sent else None,
            "last_acked": self.last_acked.isoformat() if self.last_acked else None,
            "acked": dict(sorted(self.acked.items())),
        }


_WATCH_FIELDS = tuple(f.name for f in dataclasses.fields(WatchState))


def evolve(w: WatchState, **changes: Any) -> WatchState:
    """`dataclasses.replace` for a WatchState without its per-call introspection: a Delta stream derives a
    new state on every push and ACK, and with 1,000 streams that cost is a push's convergence time."""
    new = object.__new__(WatchState)
    for name in _WATCH_FIELDS:
        object.__setattr__(new, name, changes.pop(name) if name in changes else getattr(w, name))
    if changes:
        raise TypeError(f"WatchState has no field(s) {', '.join(sorted(changes))}")
    return new


def frozen_map(values: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(values)) if values else _EMPTY


class VersionMap(Mapping[str, str]):
    """An immutable name -> version map whose `updated()` costs what it changes, not the map's size.

    A Delta stream holds one per kind (sent, acked, pending) and derives a new one on every event; copying
    10,000 entries per event (and per stream) would make each push cost the size of the mesh. A new map
    shares its predecessor's base dict and records only the differences; once they outgrow about the square
    root of the base, they are folded into a fresh base (amortised O(changes)). Base dicts are never mutated,
    so maps derived from one another (and the caller's dict handed to `of`) may share them freely.
    """

    __slots__ = ("_base", "_gone", "_over", "_size")

    def __init__(self, base: dict[str, str], over: dict[str, str], gone: frozenset[str], size: int) -> None:
        self._base = base
        self._over = over  # entries added or changed on top of the base
        self._gone = gone  # base entries removed
        self._size = size

    @classmethod
    def of(cls, values: Mapping[str, str]) -> VersionMap:
        """A map of these entries; a plain dict is adopted as the base (the caller must not change it)."""
        if isinstance(values, VersionMap):
            return values
        base = values if type(values) is dict else dict(values)
        return cls(base, {}, frozenset(), len(base))

    def __getitem__(self, name: str) -> str:
        found = self._over.get(name)
        if found is not None:
            return found
        if name in self._gone:
            raise KeyError(name)
        return self._base[name]

    def __contains__(self, name: object) -> bool:
        return name in self._over or (name in self._base and name not in self._gone)

    def get(self, name: str, default: Any = None) -> Any:
        found = self._over.get(name)
        if found is not None:
            return found
        if name in self._gone:
            return default
        return self._base.get(name, default)

    def __iter__(self) -> Iterator[str]:
        yield from self._over
        over, gone = self._over, self._gone
        for name in self._base:
            if name not in over and name not in gone:
                yield name

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"VersionMap({dict(self)!r})"

    def updated(
        self,
        updates: Mapping[str, str] = _EMPTY,
        removals: Iterable[str] = (),
        *,
        rebase: dict[str, str] | None = None,
    ) -> VersionMap:
        """This map with `updates` applied, then `removals` dropped.

        `rebase`: a shared dict this map is likely close to (the cache's current versions, for a wildcard
        stream); when the differences are folded, they are taken relative to it, so that many streams keep
        sharing one base instead of each growing a private copy.
        """
        removals = [name for name in removals if name in updates or name in self]
        if not updates and not removals:
            return self
        if not self._size and not removals:
            return VersionMap.of(updates)  # the common first response: share the new versions as they are
        size = self._size
        over = dict(self._over)
        gone = set(self._gone)
        base = self._base
        for name, version in updates.items():
            if name not in self:
                size += 1
            gone.discard(name)
            if base.get(name) == version:
                over.pop(name, None)  # back to what the (possibly shared) base says: nothing to record
            else:
                over[name] = version
        for name in removals:
            if name in over or (name in self._base and name not in gone):
                size -= 1
            over.pop(name, None)
            if name in self._base:
                gone.add(name)
        if len(over) + len(gone) > _fold_limit(len(self._base)):
            merged = {k: v for k, v in self._base.items() if k not in gone}
            merged.update(over)
            if rebase is not None and rebase is not self._base:
                diff = {k: v for k, v in merged.items() if rebase.get(k) != v}
                missing = frozenset(k for k in rebase if k not in merged)
                if len(diff) + len(missing) <= _fold_limit(len(rebase)) // 2:
                    return VersionMap(rebase, diff, missing, len(merged))
            return VersionMap(merged, {}, frozenset(), len(merged))
        return VersionMap(self._base, over, frozenset(gone), size)


def _fold_limit(base_size: int) -> int:
    return 64 + int(base_size**0.5)


EMPTY_VERSIONS = VersionMap({}, {}, frozenset(), 0)


# What a request was, as the machines classify it (for logs, metrics and tests).
INIT = "INIT"
RECONNECT = "RECONNECT"
ACK = "ACK"
NACK = "NACK"
STALE_NONCE = "STALE"
UNSUBSCRIBE = "UNSUBSCRIBE"
SUBSCRIPTION_CHANGE = "SUBSCRIPTION_CHANGE"
FORCED = "FORCED"


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one request: what to send, and how the subscription moved."""

    event: str
    type_url: str
    responses: tuple[object, ...] = ()
    subscribed: frozenset[str] = frozenset()
    unsubscribed: frozenset[str] = frozenset()
    detail: str = ""
