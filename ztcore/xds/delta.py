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

Per-stream bookkeeping (sent, acked, pending) lives in `VersionMap`s, so an event costs what it changes,
not the size of the mesh. With `encode=True` responses are `EncodedDeltaResponse`s: the cache's
pre-serialised resource entries joined behind an encoded header, never copied into a message per stream.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from ztcore.untrusted import clip
from ztcore.xds import status as st
from ztcore.xds.cache import Change, FullSet, ResourceView
from ztcore.xds.resources import Resource, length_delimited
from ztcore.xds.sotw import NACK_DETAIL_LIMIT, NonceFactory, StreamBase
from ztcore.xds.status import EMPTY_VERSIONS, VersionMap
from ztcore.xds.typeurls import WILDCARD


class EncodedDeltaResponse:
    """A DeltaDiscoveryResponse kept as bytes: the stream's header fields (version, type, control plane: encoded
    once per version; nonce and removals per response), then each resource's pre-serialised entry
    (`Resource.delta_wire`). Protobuf parsers accept fields in any order, so the concatenation is a valid
    message. gRPC sends `SerializeToString()`; reading any other field decodes a copy."""

    __slots__ = ("_body", "_head", "_message", "_resources", "nonce", "type_url")

    def __init__(
        self, head: bytes, type_url: str, nonce: str, resources: Sequence[Resource], body: bytes | None = None
    ) -> None:
        """`body`: the resources' joined wire entries when already at hand (a shared FullSet)."""
        self._head = head
        self.type_url = type_url
        self.nonce = nonce
        self._resources = resources
        self._body = body
        self._message: discovery_pb2.DeltaDiscoveryResponse | None = None

    def SerializeToString(self) -> bytes:  # the protobuf method gRPC serializers call
        body = self._body if self._body is not None else b"".join(r.delta_wire for r in self._resources)
        return self._head + body

    @property
    def resource_count(self) -> int:
        return len(self._resources)

    @property
    def message(self) -> discovery_pb2.DeltaDiscoveryResponse:
        if self._message is None:
            self._message = discovery_pb2.DeltaDiscoveryResponse.FromString(self.SerializeToString())
        return self._message

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


class DeltaStream(StreamBase):
    def __init__(
        self,
        view: ResourceView,
        *,
        nonces: NonceFactory | None = None,
        control_plane: str = "",
        encode: bool = False,
    ) -> None:
        super().__init__(view, nonces=nonces, control_plane=control_plane)
        self._encode = encode
        # control_plane (field 7) as encoded bytes: the same in every response of the stream
        self._control_plane_wire = (
            discovery_pb2.DeltaDiscoveryResponse(control_plane=self._control_plane).SerializeToString()
            if self._control_plane is not None
            else b""
        )

    def handle_request(self, req: discovery_pb2.DeltaDiscoveryRequest, now: dt.datetime) -> st.Step:
        type_url = req.type_url
        if self.node is None and req.HasField("node"):
            self.node = base_pb2.Node()
            self.node.CopyFrom(req.node)
        w = self._watches.get(type_url)
        if req.HasField("error_detail"):
            detail = clip(req.error_detail.message, NACK_DETAIL_LIMIT) or f"rejected with code {req.error_detail.code}"
            if w is not None:
                self._watches[type_url] = st.evolve(
                    w, last_error=detail, last_nacked=now, pending=EMPTY_VERSIONS, pending_removed=frozenset()
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
        sent = VersionMap.of(dict(req.initial_resource_versions)) if first else VersionMap.of(w.sent)

        if (
            not first
            and req.response_nonce
            and req.response_nonce == w.nonce_sent
            and not req.resource_names_subscribe
            and not req.resource_names_unsubscribe
        ):
            return self._ack(w, req.response_nonce, now)  # the common request: a plain ACK of the latest push
        is_ack = bool(req.response_nonce) and req.response_nonce == w.nonce_sent and not first
        stale = bool(req.response_nonce) and not is_ack and not first
        state = st.evolve(
            w, names=frozenset(names), wildcard=wildcard, explicit=w.explicit or bool(subscribe or unsubscribe)
        )
        if is_ack:
            state = self._acked(w, state, req.response_nonce, now)

        to_send: dict[str, Resource] = {}
        removed: set[str] = set()
        everything = first and wildcard and not names and not sent
        full = self._view.full_set(type_url) if everything else None
        if full is not None:
            pass  # a fresh wildcard subscriber gets the type's shared full set, as it is
        elif first:
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
            unsent: list[str] = []
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
                    unsent.append(canonical)
            sent = sent.updated(removals=unsent)
        state = st.evolve(state, sent=sent)
        self._watches[type_url] = state

        if first:
            event = st.RECONNECT if req.initial_resource_versions else st.INIT
        elif stale:
            event = st.STALE_NONCE
        elif subscribe or unsubscribe:
            event = st.SUBSCRIPTION_CHANGE
        else:
            event = st.ACK
        responses = self._respond(type_url, to_send, removed, now, full) if (first or to_send or removed) else ()
        return st.Step(
            event,
            type_url,
            responses,
            subscribed=frozenset(newly - set(w.names)),
            unsubscribed=frozenset(dropped),
            detail=f"nonce {clip(req.response_nonce, 64)}, last sent {w.nonce_sent}" if stale else "",
        )

    def handle_plain_ack(self, req: discovery_pb2.DeltaDiscoveryRequest, now: dt.datetime) -> st.Step | None:
        w = self._watches.get(req.type_url)
        if (
            w is None
            or not req.response_nonce
            or req.response_nonce != w.nonce_sent
            or req.resource_names_subscribe
            or req.resource_names_unsubscribe
            or req.HasField("error_detail")
            or (self.node is None and req.HasField("node"))
        ):
            return None
        return self._ack(w, req.response_nonce, now)

    def _ack(self, w: st.WatchState, nonce: str, now: dt.datetime) -> st.Step:
        """What the general path does for an ACK that changes no subscription, without its set algebra."""
        self._watches[w.type_url] = self._acked(w, w, nonce, now)
        return st.Step(st.ACK, w.type_url)

    def _acked(self, w: st.WatchState, base: st.WatchState, nonce: str, now: dt.datetime) -> st.WatchState:
        """`base` with what `w` had pending recorded as ACKed (both paths of an ACK end here)."""
        shared = self._view.full_set(w.type_url) if w.wildcard else None
        acked = VersionMap.of(w.acked).updated(
            w.pending, w.pending_removed, rebase=shared.versions if shared is not None else None
        )
        return st.evolve(
            base,
            nonce_acked=nonce,
            last_acked=now,
            last_error="",
            version_acked=w.version_sent,
            acked=acked,
            pending=EMPTY_VERSIONS,
            pending_removed=frozenset(),
        )

    def handle_change(self, change: Change, now: dt.datetime) -> tuple[Any, ...]:
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
        self,
        type_url: str,
        to_send: Mapping[str, Resource],
        removed: Iterable[str],
        now: dt.datetime,
        full: FullSet | None = None,
    ) -> tuple[Any, ...]:
        """One response with `to_send` and `removed`, or with every resource of `full` (then to_send is empty)."""
        w = self._watches[type_url]
        nonce = self._nonces()
        version = self._view.version(type_url)
        removed = sorted(removed)
        ordered = full.resources if full is not None else [to_send[name] for name in sorted(to_send)]
        out: Any
        if self._encode:
            # system_version_info (1), type_url (4), control_plane (7), nonce (5), removed_resources (6)
            head = (
                length_delimited(1, version.encode())
                + length_delimited(4, type_url.encode())
                + self._control_plane_wire
                + length_delimited(5, nonce.encode())
            )
            if removed:
                head += b"".join(length_delimited(6, name.encode()) for name in removed)
            out = EncodedDeltaResponse(head, type_url, nonce, ordered, full.delta_wire if full is not None else None)
        else:
            out = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version, type_url=type_url, nonce=nonce, removed_resources=removed
            )
            if self._control_plane is not None:
                out.control_plane.CopyFrom(self._control_plane)
            out.resources.extend(r.delta for r in ordered)
        # Never modified once made: the maps below may adopt it as their (possibly shared) base.
        versions = full.versions if full is not None else {res.name: res.version for res in ordered}
        # A wildcard stream tracks the cache closely: let its maps fold onto the cache's shared versions.
        shared = self._view.full_set(type_url) if w.wildcard else None
        rebase = shared.versions if shared is not None else None
        pending_removed = w.pending_removed
        if pending_removed and versions:
            pending_removed = frozenset(n for n in pending_removed if n not in versions)
        if removed:
            pending_removed = pending_removed | set(removed)
        self._watches[type_url] = st.evolve(
            w,
            nonce_sent=nonce,
            version_sent=version,
            last_sent=now,
            sent=VersionMap.of(w.sent).updated(versions, removed, rebase=rebase),
            pending=VersionMap.of(w.pending).updated(versions, removed),
            pending_removed=pending_removed,
        )
        return (out,)
