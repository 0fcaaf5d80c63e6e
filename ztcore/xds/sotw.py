"""State-of-the-world xDS, one stream: request in → responses out. No gRPC, no clock, no IO.

The ACK/NACK rules are istio's `pkg/xds` ShouldRespond:
- a request with `error_detail` is a NACK: record the error, keep the last accepted versions, send nothing;
- an empty name list on a non-wildcard type unsubscribes the type;
- an empty nonce, or a type the stream has no state for, is an initial request (or a reconnect): answer;
- a nonce other than the last one sent is stale: ignore it;
- a matching nonce is an ACK: answer only when names were added (non-wildcard types) or changed (wildcard
  types), or when a forced answer was asked for (warming). A plain ACK never gets a resend.
Pushes go only to streams whose subscription covers a changed name, and only when the version the stream
last sent differs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import secrets
from collections.abc import Callable, Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from ztcore.untrusted import clip
from ztcore.xds import status as st
from ztcore.xds.cache import Change, ResourceView
from ztcore.xds.resources import Resource
from ztcore.xds.typeurls import WILDCARD, is_wildcard_type

# A NACK's error_detail is kept (syncz, proxy-status) and logged: bounded, whatever the client sent.
NACK_DETAIL_LIMIT = 1024

NonceFactory = Callable[[], str]


def nonce_sequence() -> NonceFactory:
    """One stream's nonces: a random prefix drawn once, then a counter. Unique on the stream (a stale ACK never
    matches a later response) and across streams, without a urandom call per response (1,000 streams x every
    push)."""
    prefix = secrets.token_hex(8)
    counter = itertools.count(1)
    return lambda: f"{prefix}-{next(counter)}"


def merged(base: Mapping[str, str], extra: Mapping[str, str]) -> Mapping[str, str]:
    out = dict(base)
    out.update(extra)
    return st.frozen_map(out)


class StreamBase:
    """What both protocol variants keep per stream: the cache view, nonces, and one WatchState per type."""

    def __init__(self, view: ResourceView, *, nonces: NonceFactory | None = None, control_plane: str = "") -> None:
        """`nonces`: the stream's nonce source (default: its own `nonce_sequence()`)."""
        self._view = view
        self._nonces = nonces if nonces is not None else nonce_sequence()
        self._control_plane = base_pb2.ControlPlane(identifier=control_plane) if control_plane else None
        self._watches: dict[str, st.WatchState] = {}
        self.node: base_pb2.Node | None = None

    def watch_state(self, type_url: str) -> st.WatchState | None:
        return self._watches.get(type_url)

    def statuses(self) -> dict[str, st.WatchState]:
        return dict(self._watches)


class SotwStream(StreamBase):
    def handle_plain_ack(self, req: discovery_pb2.DiscoveryRequest, now: dt.datetime) -> st.Step | None:
        """SotW ACKs may be answered (warming, names added): they all take the ordered path."""
        return None

    def force_next_response(self, type_url: str) -> None:
        """Answer the next ACK of this type even if nothing changed (Envoy waits for it while warming)."""
        w = self._watches.get(type_url)
        if w is not None:
            self._watches[type_url] = dataclasses.replace(w, always_respond=True)

    def handle_request(self, req: discovery_pb2.DiscoveryRequest, now: dt.datetime) -> st.Step:
        type_url = req.type_url
        if self.node is None and req.HasField("node"):
            self.node = base_pb2.Node()
            self.node.CopyFrom(req.node)
        w = self._watches.get(type_url)
        if req.HasField("error_detail"):
            detail = clip(req.error_detail.message, NACK_DETAIL_LIMIT) or f"rejected with code {req.error_detail.code}"
            if w is not None:
                self._watches[type_url] = dataclasses.replace(
                    w, last_error=detail, last_nacked=now, pending=st.frozen_map({})
                )
            return st.Step(st.NACK, type_url, detail=detail)
        names = frozenset(req.resource_names)
        if not names and not is_wildcard_type(type_url):
            if w is not None:
                del self._watches[type_url]
            return st.Step(st.UNSUBSCRIBE, type_url, unsubscribed=w.names if w else frozenset())
        wildcard = is_wildcard_type(type_url) and (not names or WILDCARD in names)
        explicit = names - {WILDCARD}
        if not req.response_nonce or w is None:
            before = w.names if w is not None else frozenset()
            self._watches[type_url] = st.WatchState(type_url, names=explicit, wildcard=wildcard)
            responses = self._respond(type_url, None, now)
            event = st.INIT if not req.response_nonce else st.RECONNECT
            return st.Step(event, type_url, responses, subscribed=explicit - before, unsubscribed=before - explicit)
        if req.response_nonce != w.nonce_sent:
            detail = f"nonce {clip(req.response_nonce, 64)}, last sent {w.nonce_sent}"
            return st.Step(st.STALE_NONCE, type_url, detail=detail)
        acked = w.pending if w.wildcard else merged(w.acked, w.pending)
        self._watches[type_url] = dataclasses.replace(
            w,
            names=explicit,
            wildcard=wildcard,
            nonce_acked=req.response_nonce,
            version_acked=req.version_info,
            last_acked=now,
            last_error="",
            acked=acked,
            pending=st.frozen_map({}),
            always_respond=False,
        )
        added, removed = explicit - w.names, w.names - explicit
        if w.always_respond:
            return st.Step(st.FORCED, type_url, self._respond(type_url, None, now), added, removed)
        if not added and not removed and wildcard == w.wildcard:
            return st.Step(st.ACK, type_url)
        if not is_wildcard_type(type_url) and not added:
            # Fewer names: the client drops the others itself; nothing to send.
            return st.Step(st.SUBSCRIPTION_CHANGE, type_url, unsubscribed=removed)
        return st.Step(st.SUBSCRIPTION_CHANGE, type_url, self._respond(type_url, None, now), added, removed)

    def handle_change(self, change: Change, now: dt.datetime) -> tuple[discovery_pb2.DiscoveryResponse, ...]:
        w = self._watches.get(change.type_url)
        if w is None or not self._view.sees(change):
            return ()
        if w.wildcard:
            for name in change.names:
                current = self._view.get(change.type_url, name)
                if (current.version if current is not None else None) != w.sent.get(name):
                    return self._respond(change.type_url, None, now)
            return ()
        wanted: list[str] = []
        for name in sorted(change.names):
            current = self._view.get(change.type_url, name)
            if current is None:
                continue  # SotW has no removal signal for non-wildcard types
            watched = current.name in w.names or any(a in w.names for a in current.aliases)
            if watched and w.sent.get(current.name) != current.version:
                wanted.append(current.name)
        return self._respond(change.type_url, wanted, now) if wanted else ()

    def _respond(
        self, type_url: str, names: Iterable[str] | None, now: dt.datetime
    ) -> tuple[discovery_pb2.DiscoveryResponse, ...]:
        """Build one response: the whole subscription (names=None) or just `names`."""
        w = self._watches[type_url]
        selected: dict[str, Resource] = {}
        if w.wildcard:
            selected = dict(self._view.all(type_url))
        else:
            for name in sorted(w.names if names is None else names):
                found = self._view.get(type_url, name)
                if found is not None:
                    selected[found.name] = found
        if not selected and not w.wildcard:
            return ()  # nothing exists yet; the change that creates it will be pushed
        nonce = self._nonces()
        version = self._view.version(type_url)
        resp = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=nonce)
        if self._control_plane is not None:
            resp.control_plane.CopyFrom(self._control_plane)
        ordered = [selected[name] for name in sorted(selected)]
        resp.resources.extend(r.any for r in ordered)
        versions = {r.name: r.version for r in ordered}
        self._watches[type_url] = dataclasses.replace(
            w,
            nonce_sent=nonce,
            version_sent=version,
            last_sent=now,
            sent=st.frozen_map(versions) if w.wildcard else merged(w.sent, versions),
            pending=st.frozen_map(versions) if w.wildcard else merged(w.pending, versions),
        )
        return (resp,)
