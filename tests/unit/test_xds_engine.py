"""The xDS engine: cache, SotW and Delta machines (tables after istio's TestShouldRespond and delta tests),
and the gRPC binding over a real loopback gRPC server."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from hypothesis import given, settings
from hypothesis import strategies as hst

from ztcore.xds import status as st
from ztcore.xds import typeurls
from ztcore.xds.cache import GLOBAL_SCOPE, Change, SnapshotCache
from ztcore.xds.delta import DeltaStream
from ztcore.xds.grpc_adapter import SourceError, XdsStreams
from ztcore.xds.resources import Resource, content_version
from ztcore.xds.sotw import SotwStream

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CDS, EDS, SDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.SECRET


def cluster(name: str, timeout_ms: int = 1000, aliases: tuple[str, ...] = ()) -> Resource:
    msg = cluster_pb2.Cluster(name=name)
    msg.connect_timeout.FromMilliseconds(timeout_ms)
    return Resource.pack(name, msg, aliases=aliases)


def endpoints(name: str, port: int = 80) -> Resource:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    ep = cla.endpoints.add().lb_endpoints.add().endpoint
    ep.address.socket_address.address = "10.0.0.1"
    ep.address.socket_address.port_value = port
    return Resource.pack(name, cla)


def secret(name: str, data: bytes = b"x") -> Resource:
    return Resource.pack(name, secret_pb2.Secret(name=name, generic_secret=secret_pb2.GenericSecret()))


def counter_nonces() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"n{next(counter)}"


def sotw_req(type_url: str, names: list[str] = [], nonce: str = "", version: str = "", error: str = ""):  # noqa: B006
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=names, response_nonce=nonce, version_info=version
    )
    if error:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def delta_req(
    type_url: str,
    sub: list[str] = [],  # noqa: B006
    unsub: list[str] = [],  # noqa: B006
    nonce: str = "",
    initial: dict[str, str] | None = None,
    error: str = "",
):
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url, resource_names_subscribe=sub, resource_names_unsubscribe=unsub, response_nonce=nonce
    )
    for k, v in (initial or {}).items():
        req.initial_resource_versions[k] = v
    if error:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def names_of(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for any_msg in resp.resources:
        if any_msg.type_url == CDS:
            m = cluster_pb2.Cluster()
            any_msg.Unpack(m)
            out.append(m.name)
        elif any_msg.type_url == EDS:
            e = endpoint_pb2.ClusterLoadAssignment()
            any_msg.Unpack(e)
            out.append(e.cluster_name)
        else:
            s = secret_pb2.Secret()
            any_msg.Unpack(s)
            out.append(s.name)
    return out


def populated() -> SnapshotCache:
    cache = SnapshotCache()
    cache.set_resources(CDS, [cluster("a"), cluster("b")])
    cache.set_resources(EDS, [endpoints("a"), endpoints("b")])
    cache.set_resources(SDS, [secret("ROOTCA")])
    return cache


# -- resources and cache -----------------------------------------------------------------------------


def test_resource_is_packed_once_with_a_content_version() -> None:
    res = cluster("a")
    msg = cluster_pb2.Cluster(name="a")
    msg.connect_timeout.FromMilliseconds(1000)
    assert res.any.value == msg.SerializeToString(deterministic=False) or res.any.value
    assert res.type_url == CDS
    assert res.version == content_version(CDS, res.any.value) == cluster("a").version
    assert res.version != cluster("a", 2000).version
    assert res.delta.name == "a" and res.delta.version == res.version and res.delta.resource == res.any
    with pytest.raises(ValueError, match="needs a name"):
        Resource.pack("", msg)


def test_cache_reports_changed_names_and_notifies_watchers() -> None:
    cache = SnapshotCache()
    seen: list[Change] = []
    stop = cache.watch(seen.append)
    assert cache.set_resources(CDS, [cluster("a"), cluster("b")]) == {"a", "b"}
    assert cache.set_resources(CDS, [cluster("a"), cluster("b")]) == frozenset()  # same content: no change
    assert cache.set_resources(CDS, [cluster("a", 5)]) == {"a", "b"}  # a updated, b removed
    assert cache.upsert(CDS, [cluster("c")], scope="spiffe://x") == {"c"}
    assert [c.names for c in seen] == [{"a", "b"}, {"a", "b"}, {"c"}]
    assert seen[-1].scope == "spiffe://x" and seen[-1].revision == cache.revision == 3
    assert cache.version(CDS) == 2 and cache.version(CDS, "spiffe://x") == 3
    cache.drop_scope("spiffe://x")
    assert cache.resources(CDS, "spiffe://x") == {} and seen[-1].names == {"c"}
    stop()
    cache.remove(CDS, ["a"])
    assert len(seen) == 4


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ([cluster("a"), cluster("a")], "duplicate"),
        ([endpoints("a")], "is a type.googleapis.com/envoy.config.endpoint"),
    ],
)
def test_cache_refuses_inconsistent_sets_before_publishing(resources: list[Resource], message: str) -> None:
    cache = SnapshotCache()
    with pytest.raises(ValueError, match=message):
        cache.set_resources(CDS, resources)
    assert cache.revision == 0


def test_view_prefers_own_scope_and_resolves_aliases() -> None:
    cache = SnapshotCache()
    cache.upsert(SDS, [secret("default", b"global"), secret("ROOTCA")])
    cache.upsert(SDS, [Resource.pack("default", secret_pb2.Secret(name="default", session_ticket_keys={}))], scope="me")
    cache.upsert(CDS, [cluster("outbound|80||a.svc", aliases=("10.0.0.1",))])
    view = cache.view(["me"])
    assert view.get(SDS, "default") is cache.get(SDS, "default", "me")
    assert view.get(SDS, "ROOTCA") is cache.get(SDS, "ROOTCA")
    assert set(view.all(SDS)) == {"default", "ROOTCA"}
    assert view.get(CDS, "10.0.0.1") is not None and view.get(CDS, "10.0.0.1").name == "outbound|80||a.svc"
    assert view.sees(Change(SDS, GLOBAL_SCOPE, frozenset(), 1)) and not view.sees(Change(SDS, "you", frozenset(), 1))


# -- SotW: istio TestShouldRespond --------------------------------------------------------------------


@dataclass
class SotwCase:
    name: str
    type_url: str
    first: list[str] | None  # names of the initial request (nonce ""); None: no initial request
    request: Callable[[st.WatchState], discovery_pb2.DiscoveryRequest]
    event: str
    responds: list[str] | None  # resource names of the response, None = no response
    force: bool = False
    check: Callable[[st.WatchState | None], None] = field(default=lambda w: None)


def _ack(names: list[str], **kw) -> Callable[[st.WatchState], discovery_pb2.DiscoveryRequest]:
    return lambda w: sotw_req(w.type_url, names, nonce=w.nonce_sent, version=w.version_sent, **kw)


SOTW_CASES = [
    SotwCase("initial", EDS, ["a"], lambda w: sotw_req(EDS, ["a"]), st.INIT, ["a"]),
    SotwCase("ack", EDS, ["a"], _ack(["a"]), st.ACK, None, check=lambda w: _synced(w)),
    SotwCase("ack forced", EDS, ["a"], _ack(["a"]), st.FORCED, ["a"], force=True),
    SotwCase(
        "nack",
        EDS,
        ["a"],
        _ack(["a"], error="bad endpoint"),
        st.NACK,
        None,
        check=lambda w: _nacked(w, "bad endpoint"),
    ),
    SotwCase("reconnect", EDS, None, lambda w: sotw_req(EDS, ["a"], nonce="from-old-stream"), st.RECONNECT, ["a"]),
    SotwCase("resources added", EDS, ["a"], _ack(["a", "b"]), st.SUBSCRIPTION_CHANGE, ["a", "b"]),
    SotwCase("ack with same resources", EDS, ["a", "b"], _ack(["b", "a"]), st.ACK, None),
    SotwCase("resources removed (non-wildcard)", EDS, ["a", "b"], _ack(["a"]), st.SUBSCRIPTION_CHANGE, None),
    SotwCase(
        "unsubscribe EDS",
        EDS,
        ["a"],
        lambda w: sotw_req(EDS, [], nonce=w.nonce_sent),
        st.UNSUBSCRIBE,
        None,
        check=lambda w: _gone(w),
    ),
    SotwCase("stale nonce", EDS, ["a"], lambda w: sotw_req(EDS, ["a", "b"], nonce="old"), st.STALE_NONCE, None),
    SotwCase("wildcard initial", CDS, [], lambda w: sotw_req(CDS, []), st.INIT, ["a", "b"]),
    SotwCase("wildcard ack", CDS, [], _ack([]), st.ACK, None),
    SotwCase("wildcard names change", CDS, [], _ack(["a"]), st.SUBSCRIPTION_CHANGE, ["a"]),
    SotwCase("explicit '*' is wildcard", CDS, ["*"], _ack(["*"]), st.ACK, None, check=lambda w: _wild(w)),
    # Nothing was sent (no nonce yet), so a repeated request is initial again, and still has nothing to send.
    SotwCase("missing secret: nothing to send yet", SDS, ["default"], _ack(["default"]), st.INIT, None),
]


def _synced(w: st.WatchState | None) -> None:
    assert w is not None and w.status == st.SYNCED and w.acked == w.sent and not w.pending


def _nacked(w: st.WatchState | None, detail: str) -> None:
    assert w is not None and w.status == st.ERROR and w.last_error == detail
    assert w.nonce_acked == "" and w.acked == {}, "a NACK never counts as accepted"


def _gone(w: st.WatchState | None) -> None:
    assert w is None


def _wild(w: st.WatchState | None) -> None:
    assert w is not None and w.wildcard and w.names == frozenset()


@pytest.mark.parametrize("case", SOTW_CASES, ids=lambda c: c.name)
def test_sotw_should_respond(case: SotwCase) -> None:
    stream = SotwStream(populated().view([]), nonces=counter_nonces())
    w = st.WatchState(case.type_url)
    if case.first is not None:
        first = stream.handle_request(sotw_req(case.type_url, case.first), NOW)
        assert first.event == st.INIT
        w = stream.watch_state(case.type_url) or w
    if case.force:
        stream.force_next_response(case.type_url)
    step = stream.handle_request(case.request(w), NOW)
    assert step.event == case.event
    if case.responds is None:
        assert step.responses == ()
    else:
        assert len(step.responses) == 1
        resp = step.responses[0]
        assert sorted(names_of(resp)) == case.responds and resp.type_url == case.type_url and resp.nonce
    case.check(stream.watch_state(case.type_url))


def test_sotw_nack_keeps_the_last_good_versions() -> None:
    cache = populated()
    stream = SotwStream(cache.view([]), nonces=counter_nonces())
    init = stream.handle_request(sotw_req(EDS, ["a"]), NOW).responses[0]
    stream.handle_request(sotw_req(EDS, ["a"], nonce=init.nonce, version=init.version_info), NOW)
    good = stream.watch_state(EDS).acked["a"]
    cache.upsert(EDS, [endpoints("a", 81)])
    push = stream.handle_change(Change(EDS, "", frozenset({"a"}), cache.revision), NOW)[0]
    step = stream.handle_request(sotw_req(EDS, ["a"], nonce=push.nonce, version=init.version_info, error="port"), NOW)
    assert step.event == st.NACK and step.responses == ()
    w = stream.watch_state(EDS)
    assert w.acked["a"] == good and w.sent["a"] != good and w.status == st.ERROR
    # The same (rejected) version is not sent again; a fixed one is, and its ACK clears the error.
    assert stream.handle_change(Change(EDS, "", frozenset({"a"}), cache.revision), NOW) == ()
    cache.upsert(EDS, [endpoints("a", 82)])
    fix = stream.handle_change(Change(EDS, "", frozenset({"a"}), cache.revision), NOW)[0]
    stream.handle_request(sotw_req(EDS, ["a"], nonce=fix.nonce, version=fix.version_info), NOW)
    assert stream.watch_state(EDS).status == st.SYNCED and stream.watch_state(EDS).last_error == ""


def test_sotw_pushes_only_to_streams_watching_a_changed_name() -> None:
    cache = populated()
    one, two = (SotwStream(cache.view([]), nonces=counter_nonces()) for _ in range(2))
    for stream, name in ((one, "a"), (two, "b")):
        r = stream.handle_request(sotw_req(EDS, [name]), NOW).responses[0]
        stream.handle_request(sotw_req(EDS, [name], nonce=r.nonce, version=r.version_info), NOW)
    cache.upsert(EDS, [endpoints("a", 9090)])
    change = Change(EDS, "", frozenset({"a"}), cache.revision)
    pushed = one.handle_change(change, NOW)
    assert len(pushed) == 1 and names_of(pushed[0]) == ["a"]
    assert two.handle_change(change, NOW) == ()
    assert one.handle_change(change, NOW) == (), "the same version is never sent twice"


def test_sotw_wildcard_push_carries_the_full_state_after_a_removal() -> None:
    cache = populated()
    stream = SotwStream(cache.view([]), nonces=counter_nonces())
    stream.handle_request(sotw_req(CDS, []), NOW)
    changed = cache.set_resources(CDS, [cluster("a")])
    (resp,) = stream.handle_change(Change(CDS, "", changed, cache.revision), NOW)
    assert names_of(resp) == ["a"]


def test_sotw_secret_sent_when_it_appears_and_scopes_are_separate() -> None:
    cache = populated()
    mine = SotwStream(cache.view(["spiffe://td/ns/a/sa/x"]), nonces=counter_nonces())
    other = SotwStream(cache.view(["spiffe://td/ns/a/sa/y"]), nonces=counter_nonces())
    for s in (mine, other):
        step = s.handle_request(sotw_req(SDS, ["default", "ROOTCA"]), NOW)
        assert names_of(step.responses[0]) == ["ROOTCA"]
        assert step.subscribed == {"default", "ROOTCA"}
    cache.upsert(SDS, [secret("default")], scope="spiffe://td/ns/a/sa/x")
    change = Change(SDS, "spiffe://td/ns/a/sa/x", frozenset({"default"}), cache.revision)
    assert [names_of(r) for r in mine.handle_change(change, NOW)] == [["default"]]
    assert other.handle_change(change, NOW) == ()


@settings(max_examples=300, deadline=None)
@given(
    hst.lists(
        hst.tuples(
            hst.sampled_from(("upsert", "upsert", "remove")),
            hst.sampled_from("abcd"),
            hst.sets(hst.sampled_from(("10.0.0.1", "10.0.0.2", "10.0.0.3")), max_size=2),
            hst.integers(1, 2),
        ),
        max_size=30,
    )
)
def test_aliases_resolve_as_a_rebuild_of_the_whole_alias_map_would(steps: list[tuple[str, str, set[str], int]]) -> None:
    """The alias map is kept up to date per change; it must answer as rebuilding it from every resource (in the
    order they entered the set, the latest holder of an alias winning) would."""
    cache = SnapshotCache()
    for action, name, aliases, timeout in steps:
        if action == "upsert":
            cache.upsert(CDS, [cluster(name, timeout * 1000, tuple(sorted(aliases)))])
        else:
            cache.remove(CDS, [name])
        rebuilt = {alias: res.name for res in cache.resources(CDS).values() for alias in res.aliases}
        for alias in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            found = cache.get(CDS, alias)
            assert (found.name if found else None) == rebuilt.get(alias), (alias, steps)


@settings(max_examples=300, deadline=None)
@given(
    hst.lists(
        hst.tuples(
            hst.sampled_from(("upsert", "upsert", "remove", "replace")),
            hst.sets(hst.sampled_from("abcde"), min_size=1, max_size=3),
            hst.integers(1, 3),
            hst.sampled_from((GLOBAL_SCOPE, "node-1")),
            hst.booleans(),
        ),
        max_size=30,
    )
)
def test_a_full_set_derived_from_the_last_one_equals_one_built_from_every_resource(
    steps: list[tuple[str, set[str], int, str, bool]],
) -> None:
    """After a change, a type's FullSet is the previous one patched with the changed names (not rebuilt from every
    resource); asked for after any run of changes, in any scope, it must hold what the cache holds."""
    cache = SnapshotCache()
    for action, names, timeout, scope, look in steps:
        batch = [cluster(name, timeout * 1000) for name in sorted(names)]
        if action == "upsert":
            cache.upsert(CDS, batch, scope=scope)
        elif action == "replace":
            cache.set_resources(CDS, batch, scope=scope)
        else:
            cache.remove(CDS, names, scope=scope)
        if look:  # not after every change: a derivation may span several
            for s in (GLOBAL_SCOPE, "node-1"):
                full = cache.full_set(CDS, s)
                held = cache.resources(CDS, s)
                assert full.versions == {name: res.version for name, res in held.items()}, steps
                assert [r.name for r in full.resources] == sorted(held), steps
                assert full.delta_wire == b"".join(held[name].delta_wire for name in sorted(held)), steps
                assert cache.full_set(CDS, s) is full  # memoised until the next change


def test_sotw_alias_subscription_and_node_from_first_request() -> None:
    cache = SnapshotCache()
    cache.upsert(EDS, [Resource.pack("a", endpoint_pb2.ClusterLoadAssignment(cluster_name="a"), aliases=["alias-a"])])
    stream = SotwStream(cache.view([]), nonces=counter_nonces(), control_plane="ztd")
    req = sotw_req(EDS, ["alias-a"])
    req.node.CopyFrom(base_pb2.Node(id="sidecar~1.1.1.1~x.ns~ns.svc.cluster.local"))
    (resp,) = stream.handle_request(req, NOW).responses
    assert names_of(resp) == ["a"] and resp.control_plane.identifier == "ztd"
    assert stream.node is not None and stream.node.id.startswith("sidecar~")


# -- Delta ------------------------------------------------------------------------------------------------


@dataclass
class DeltaCase:
    name: str
    steps: list[Callable[[st.WatchState | None], discovery_pb2.DeltaDiscoveryRequest]]
    event: str
    sent: list[str] | None  # names in the last response (None: no response)
    removed: list[str] = field(default_factory=list)
    check: Callable[[st.WatchState | None], None] = field(default=lambda w: None)


def _d(**kw) -> Callable[[st.WatchState | None], discovery_pb2.DeltaDiscoveryRequest]:
    return lambda w: delta_req(CDS, **kw)


def _dack(**kw) -> Callable[[st.WatchState | None], discovery_pb2.DeltaDiscoveryRequest]:
    return lambda w: delta_req(CDS, nonce=w.nonce_sent if w else "", **kw)


DELTA_CASES = [
    DeltaCase("legacy wildcard", [_d()], st.INIT, ["a", "b"], check=lambda w: _wild(w)),
    DeltaCase("explicit names, one missing", [_d(sub=["a", "zzz"])], st.INIT, ["a"], ["zzz"]),
    DeltaCase(
        "reconnect skips unchanged, resends changed, removes vanished",
        [lambda w: delta_req(CDS, initial={"a": cluster("a").version, "b": "old", "gone": "v1"})],
        st.RECONNECT,
        ["b"],
        ["gone"],
    ),
    DeltaCase("ack", [_d(), _dack()], st.ACK, None, check=lambda w: _synced(w)),
    DeltaCase("nack", [_d(), _dack(error="bad cluster")], st.NACK, None, check=lambda w: _nacked(w, "bad cluster")),
    DeltaCase("stale nonce, no change", [_d(sub=["a"]), _d(nonce="old")], st.STALE_NONCE, None),
    DeltaCase("stale nonce still subscribes", [_d(sub=["a"]), _d(sub=["b"], nonce="old")], st.STALE_NONCE, ["b"]),
    DeltaCase("subscribe to a held name resends it", [_d(sub=["a"]), _dack(sub=["a"])], st.SUBSCRIPTION_CHANGE, ["a"]),
    DeltaCase("unsubscribe needs no answer", [_d(sub=["a", "b"]), _dack(unsub=["b"])], st.SUBSCRIPTION_CHANGE, None),
    DeltaCase(
        "unsubscribe under wildcard resends",
        [_d(sub=["*", "a"]), _dack(unsub=["a"])],
        st.SUBSCRIPTION_CHANGE,
        ["a"],
    ),
    DeltaCase("'*' later sends what is not held", [_d(sub=["a"]), _dack(sub=["*"])], st.SUBSCRIPTION_CHANGE, ["b"]),
    DeltaCase(
        "naming resources ends the legacy wildcard",
        [_d(), _dack(sub=["a"])],
        st.SUBSCRIPTION_CHANGE,
        ["a"],
        check=lambda w: _not_wild(w, {"a"}),
    ),
    DeltaCase(
        "ztunnel on-demand: subscribe and unsubscribe '*' = nothing",
        [_d(sub=["*"], unsub=["*"])],
        st.INIT,
        [],
        check=lambda w: _not_wild(w, set()),
    ),
    DeltaCase("alias subscription", [_d(sub=["alias-of-b"])], st.INIT, ["b"]),
]


def _not_wild(w: st.WatchState | None, names: set[str]) -> None:
    assert w is not None and not w.wildcard and w.names == names


def _delta_cache() -> SnapshotCache:
    cache = SnapshotCache()
    cache.set_resources(CDS, [cluster("a"), cluster("b", aliases=("alias-of-b",))])
    return cache


@pytest.mark.parametrize("case", DELTA_CASES, ids=lambda c: c.name)
def test_delta_should_respond(case: DeltaCase) -> None:
    stream = DeltaStream(_delta_cache().view([]), nonces=counter_nonces())
    step = None
    for make in case.steps:
        step = stream.handle_request(make(stream.watch_state(CDS)), NOW)
    assert step is not None and step.event == case.event
    if case.sent is None:
        assert step.responses == ()
    else:
        (resp,) = step.responses
        assert sorted(r.name for r in resp.resources) == case.sent
        assert sorted(resp.removed_resources) == case.removed
        assert all(r.version and r.resource.type_url == CDS for r in resp.resources)
    case.check(stream.watch_state(CDS))


@pytest.mark.parametrize("case", DELTA_CASES, ids=lambda c: c.name)
def test_a_plain_ack_handled_apart_ends_where_the_ordered_path_does(case: DeltaCase) -> None:
    """The stream reader handles plain ACKs without queueing them: same state and event as handle_request,
    and every other request is left untouched for the ordered path."""
    cache = _delta_cache()
    ordered = DeltaStream(cache.view([]), nonces=counter_nonces())
    fast = DeltaStream(cache.view([]), nonces=counter_nonces())
    steps = list(case.steps)
    # then a push and its ACK, so that every case ends with one plain ACK
    steps_after = [lambda w: delta_req(CDS, nonce=w.nonce_sent if w is not None else "")]
    taken = 0
    for i, make in enumerate(steps + steps_after):
        if i == len(steps):
            cache.upsert(CDS, [cluster("a", 9000)])
            change = Change(CDS, "", frozenset({"a"}), cache.revision)
            assert [r.nonce for r in ordered.handle_change(change, NOW)] == [
                r.nonce for r in fast.handle_change(change, NOW)
            ]
        req = make(ordered.watch_state(CDS))
        expected = ordered.handle_request(req, NOW)
        before = fast.watch_state(CDS)
        got = fast.handle_plain_ack(req, NOW)
        if got is None:
            assert fast.watch_state(CDS) is before  # untouched
            got = fast.handle_request(req, NOW)
        else:
            taken += 1
            assert expected.event == st.ACK and expected.responses == () and not expected.subscribed
        assert (got.event, got.subscribed, got.unsubscribed) == (
            expected.event,
            expected.subscribed,
            expected.unsubscribed,
        )
        assert fast.watch_state(CDS) == ordered.watch_state(CDS)
    watched = ordered.watch_state(CDS)
    if watched is not None and (watched.wildcard or "a" in watched.names):
        assert taken >= 1  # the final ACK of the push took the plain path


def test_delta_pushes_changes_and_removals_only_to_interested_streams() -> None:
    cache = _delta_cache()
    wild = DeltaStream(cache.view([]), nonces=counter_nonces())
    only_a = DeltaStream(cache.view([]), nonces=counter_nonces())
    wild.handle_request(delta_req(CDS), NOW)
    only_a.handle_request(delta_req(CDS, sub=["a"]), NOW)
    changed = cache.set_resources(CDS, [cluster("a"), cluster("c")])  # b removed, c added
    change = Change(CDS, "", changed, cache.revision)
    (resp,) = wild.handle_change(change, NOW)
    assert [r.name for r in resp.resources] == ["c"] and list(resp.removed_resources) == ["b"]
    assert only_a.handle_change(change, NOW) == ()
    cache.upsert(CDS, [cluster("a", 3000)])
    (resp_a,) = only_a.handle_change(Change(CDS, "", frozenset({"a"}), cache.revision), NOW)
    assert [r.name for r in resp_a.resources] == ["a"] and not resp_a.removed_resources
    only_a.handle_request(delta_req(CDS, unsub=["a"], nonce=resp_a.nonce), NOW)
    cache.upsert(CDS, [cluster("a", 4000)])
    assert only_a.handle_change(Change(CDS, "", frozenset({"a"}), cache.revision), NOW) == ()


def test_delta_ack_of_a_push_records_versions_and_status() -> None:
    cache = _delta_cache()
    stream = DeltaStream(cache.view([]), nonces=counter_nonces())
    (init,) = stream.handle_request(delta_req(CDS), NOW).responses
    stream.handle_request(delta_req(CDS, nonce=init.nonce), NOW)
    cache.upsert(CDS, [cluster("a", 7)])
    (push,) = stream.handle_change(Change(CDS, "", frozenset({"a"}), cache.revision), NOW)
    assert stream.watch_state(CDS).status == st.STALE
    stream.handle_request(delta_req(CDS, nonce=push.nonce), NOW)
    w = stream.watch_state(CDS)
    assert w.status == st.SYNCED and w.acked["a"] == cluster("a", 7).version and w.last_acked == NOW


# -- gRPC binding ------------------------------------------------------------------------------------------


class _Binding:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    @property
    def scopes(self) -> tuple[str, ...]:
        return (GLOBAL_SCOPE,)

    async def subscribe(self, type_url: str, names: frozenset[str]) -> None:
        if "forbidden" in names:
            raise SourceError(grpc.StatusCode.PERMISSION_DENIED, "forbidden is not yours")
        self.log.append(f"+{','.join(sorted(names))}")

    async def unsubscribe(self, type_url: str, names: frozenset[str]) -> None:
        self.log.append(f"-{','.join(sorted(names))}")

    async def close(self) -> None:
        self.log.append("closed")


class _Source:
    def __init__(self) -> None:
        self.log: list[str] = []

    async def open_stream(self, node: base_pb2.Node, peer: str) -> _Binding:
        if node.id == "refused":
            raise SourceError(grpc.StatusCode.INVALID_ARGUMENT, "node refused")
        return _Binding(self.log)


class _Ads:
    def __init__(self, streams: XdsStreams) -> None:
        self._streams = streams

    async def StreamAggregatedResources(self, requests, context) -> None:
        await self._streams.sotw(requests, context)

    async def DeltaAggregatedResources(self, requests, context) -> None:
        await self._streams.delta(requests, context)


async def test_grpc_binding_serves_sotw_and_delta_over_real_grpc() -> None:
    cache = _delta_cache()
    source = _Source()
    streams = XdsStreams(cache, source)
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Ads(streams), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
            sotw = stub.StreamAggregatedResources()
            first = sotw_req(EDS, ["a"])
            first.node.id = "sidecar~a"
            cache.upsert(EDS, [endpoints("a")])
            await sotw.write(first)
            resp = await asyncio.wait_for(sotw.read(), 5)
            assert names_of(resp) == ["a"]
            await sotw.write(sotw_req(EDS, ["a"], nonce=resp.nonce, version=resp.version_info))
            delta = stub.DeltaAggregatedResources()
            await delta.write(delta_req(CDS))
            dresp = await asyncio.wait_for(delta.read(), 5)
            assert sorted(r.name for r in dresp.resources) == ["a", "b"]
            await delta.write(delta_req(CDS, nonce=dresp.nonce))
            # A change reaches both streams, each in its own protocol.
            cache.upsert(EDS, [endpoints("a", 81)])
            cache.upsert(CDS, [cluster("a", 99)])
            pushed = await asyncio.wait_for(sotw.read(), 5)
            dpushed = await asyncio.wait_for(delta.read(), 5)
            assert names_of(pushed) == ["a"] and [r.name for r in dpushed.resources] == ["a"]
            assert {s.protocol for s in streams.streams()} == {"sotw", "delta"}
            # A source refusal ends the stream with its status and message.
            bad = stub.StreamAggregatedResources()
            await bad.write(sotw_req(EDS, ["forbidden"]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(bad.read(), 5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == "forbidden is not yours"
            refused = stub.StreamAggregatedResources()
            req = sotw_req(EDS, ["a"])
            req.node.id = "refused"
            await refused.write(req)
            with pytest.raises(grpc.aio.AioRpcError) as err2:
                await asyncio.wait_for(refused.read(), 5)
            assert err2.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await sotw.done_writing()
            await delta.done_writing()
            for _ in range(50):
                if not streams.streams():
                    break
                await asyncio.sleep(0.02)
            assert streams.streams() == []
    finally:
        await server.stop(None)
    assert "+a" in source.log and source.log.count("closed") == 3
