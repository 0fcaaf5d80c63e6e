"""Per-stream, per-type sync state: what was sent, what the client acknowledged, its last rejection."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

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


def frozen_map(values: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(values)) if values else _EMPTY


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
