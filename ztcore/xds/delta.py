"""Incremental (Delta) xDS, one stream: request in → responses out. No gRPC, no clock, no IO.

Rules (xDS protocol doc, "Incremental xDS"; istio pilot/pkg/xds/delta.go):
- `error_detail` is a NACK: record it, keep the last accepted versions, send nothing;
- subscription changes are honoured even when the nonce is stale (the spec requires it); a stale nonce
  only means the request is not an ACK;
- "*" in subscribe turns wildcard on, in unsubscribe off; a first request with both lists empty is the
  legacy wildcard, which ends when the client later names resources without "*";
- newly subscribed names are always sent, even if the client already holds them; names that do not
  exist come back in `removed_resources`;
- on a (re)connect, `initial_resource_versions` tells what the client holds: unchanged resources are not
  resent and vanished ones are reported removed;
- unsubscribing needs no answer, except when the name is still covered by wildcard: then the resource
  (or its removal) is sent again;
- pushes carry only resources whose version differs from what this stream sent, plus removals of names
  the client holds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from ztcore.xds import status as st
from ztcore.xds.cache import Change, ResourceView
from ztcore.xds.resources import Resource
from ztcore.xds.sotw import NonceFactory, merged, random_nonce
from ztcore.xds.typeurls import WILDCARD


class DeltaStream:
    def __init__(self, view: ResourceView, *, nonces: NonceFactory = random_nonce, control_plane: str = "") -> None:
        self._view = view
        self._nonces = nonces
        self._control_plane = base_pb2.ControlPlane(identifier=control_plane) if control_plane else None
        self._watches: dict[str, st.WatchState] = {}
        self.node: base_pb2.Node | None = None

    def watch_state(self, type_url: str) -> st.WatchState | None:
        return self._watches.get(type_url)

    def statuses(self) -> dict[str, st.WatchState]:
        return dict(self._watches)

    def handle_request(self, req: discovery_pb2.DeltaDiscoveryRequest, now: dt.datetime) -> st.Step:
        type_url = req.type_url
        if self.node is None and req.HasField("node"):
            self.node = base_pb2.Node()
            self.node.CopyFrom(req.node)
        w = self._watches.get(type_url)
        if req.HasField("error_detail"):
            detail = req.error_detail.message or f"rejected with code {req.error_detail.code}"
            if w is not None:
                self._watches[type_url] = dataclasses.replace(
                    w, last_error=detail, last_nacked=now, pending=st.frozen_map({}), pending_removed=frozenset()
                )
            return st.Step(st.NACK, type_url, detail=detail)

        first = w is None
        if w is None:
            w = st.WatchState(type_url)
        subscribe, unsubscribe = list(req.resource_names_subscribe), list(req.resource_names_unsubscribe)
        names, wildcard = set(w.names), w.wildcard
        legacy = w.wildcard and not w.explicit
        newly: set[str] = set()
        dropped: set[str] = set()
        became_wildcard = False
        for name in subscribe:
            if name == WILDCARD:
                became_wildcard = became_wildcard or not wildcard
                wildcard = True
            else:
                names.add(name)
                newly.add(name)
        if legacy and subscribe and WILDCARD not in subscribe:
            wildcard = False  # naming resources ends the implicit wildcard
        for name in unsubscribe:
            if name == WILDCARD:
                wildcard = False
                became_wildcard = False
            elif name in names:
                names.discard(name)
                newly.discard(name)
                dropped.add(name)
        if first and not subscribe and not unsubscribe:
            wildcard = became_wildcard = True
        sent = dict(req.initial_resource_versions) if first else dict(w.sent)

        is_ack = bool(req.response_nonce) and req.response_nonce == w.nonce_sent and not first
        stale = bool(req.response_nonce) and not is_ack and not first
        state = dataclasses.replace(
            w, names=frozenset(names), wildcard=wildcard, explicit=w.explicit or bool(subscribe or unsubscribe)
        )
        if is_ack:
            acked = {k: v for k, v in merged(w.acked, w.pending).items() if k not in w.pending_removed}
            state = dataclasses.replace(
                state,
                nonce_acked=req.response_nonce,
                last_acked=now,
                last_error="",
                version_acked=w.version_sent,
                acked=st.frozen_map(acked),
                pending=st.frozen_map({}),
                pending_removed=frozenset(),
            )

        to_send: dict[str, Resource] = {}
        removed: set[str] = set()
        if first:
            candidates = dict(self._view.all(type_url)) if wildcard else {}
            for name in names:
                found = self._view.get(type_url, name)
                if found is not None:
                    candidates[found.name] = found
                elif name not in sent:
                    removed.add(name)  # subscribed but does not exist
            to_send = {n: r for n, r in candidates.items() if sent.get(n) != r.version}
            for name in sent:
                if name not in candidates and (wildcard or name in names):
                    removed.add(name)
        else:
            for name in newly:
                found = self._view.get(type_url, name)
                if found is not None:
                    to_send[found.name] = found
                else:
                    removed.add(name)
            if became_wildcard:
                for name, res in self._view.all(type_url).items():
                    if sent.get(name) != res.version:
                        to_send[name] = res
            for name in dropped:
                found = self._view.get(type_url, name)
                canonical = found.name if found is not None else name
                if wildcard:
                    # Still covered by the wildcard: the client must hear the resource (or its absence) again.
                    if found is not None:
                        to_send[canonical] = found
                    else:
                        removed.add(canonical)
                else:
                    sent.pop(canonical, None)
        state = dataclasses.replace(state, sent=st.frozen_map(sent))
        self._watches[type_url] = state

        if first:
            event = st.RECONNECT if req.initial_resource_versions else st.INIT
        elif stale:
            event = st.STALE_NONCE
        elif subscribe or unsubscribe:
            event = st.SUBSCRIPTION_CHANGE
        else:
            event = st.ACK
        responses = self._respond(type_url, to_send, removed, now) if (first or to_send or removed) else ()
        return st.Step(
            event,
            type_url,
            responses,
            subscribed=frozenset(newly - set(w.names)),
            unsubscribed=frozenset(dropped),
            detail=f"nonce {req.response_nonce}, last sent {w.nonce_sent}" if stale else "",
        )

    def handle_change(self, change: Change, now: dt.datetime) -> tuple[discovery_pb2.DeltaDiscoveryResponse, ...]:
        w = self._watches.get(change.type_url)
        if w is None or not self._view.sees(change):
            return ()
        to_send: dict[str, Resource] = {}
        removed: set[str] = set()
        for name in change.names:
            current = self._view.get(change.type_url, name)
            if current is not None:
                watched = w.wildcard or current.name in w.names or any(a in w.names for a in current.aliases)
                if watched and w.sent.get(current.name) != current.version:
                    to_send[current.name] = current
            elif name in w.sent:
                removed.add(name)
        if not to_send and not removed:
            return ()
        return self._respond(change.type_url, to_send, removed, now)

    def _respond(
        self, type_url: str, to_send: Mapping[str, Resource], removed: set[str], now: dt.datetime
    ) -> tuple[discovery_pb2.DeltaDiscoveryResponse, ...]:
        w = self._watches[type_url]
        nonce = self._nonces()
        version = self._view.version(type_url)
        resp = discovery_pb2.DeltaDiscoveryResponse(system_version_info=version, type_url=type_url, nonce=nonce)
        if self._control_plane is not None:
            resp.control_plane.CopyFrom(self._control_plane)
        resp.resources.extend(to_send[name].delta for name in sorted(to_send))
        resp.removed_resources.extend(sorted(removed))
        versions = {name: res.version for name, res in to_send.items()}
        sent = {k: v for k, v in merged(w.sent, versions).items() if k not in removed}
        self._watches[type_url] = dataclasses.replace(
            w,
            nonce_sent=nonce,
            version_sent=version,
            last_sent=now,
            sent=st.frozen_map(sent),
            pending=merged({k: v for k, v in w.pending.items() if k not in removed}, versions),
            pending_removed=(w.pending_removed - set(versions)) | removed,
        )
        return (resp,)
