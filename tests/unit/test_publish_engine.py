"""The engine changes publishing at scale relies on: VersionMap (O(changes) per-stream bookkeeping),
encoded Delta responses (pre-serialised resources joined as bytes) and shared full sets. Each is checked
against the plain implementation it replaces."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given, settings
from hypothesis import strategies as strat

from ztcore.xds import status as st
from ztcore.xds import typeurls
from ztcore.xds.cache import Change, SnapshotCache
from ztcore.xds.delta import DeltaStream, EncodedDeltaResponse
from ztcore.xds.resources import Resource
from ztcore.xds.status import EMPTY_VERSIONS, VersionMap

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CDS = typeurls.CLUSTER

# -- VersionMap -------------------------------------------------------------------------------------------------

names = strat.sampled_from([f"r{i}" for i in range(40)])
versions = strat.sampled_from(["1", "2", "3"])
steps = strat.lists(
    strat.tuples(strat.dictionaries(names, versions, max_size=8), strat.lists(names, max_size=6)), max_size=60
)


@settings(max_examples=200, deadline=None)
@given(start=strat.dictionaries(names, versions, max_size=40), steps=steps, rebase=strat.booleans())
def test_version_map_behaves_like_a_dict(start: dict[str, str], steps: list, rebase: bool) -> None:
    model = dict(start)
    vm = VersionMap.of(dict(start))
    shared = {f"r{i}": "1" for i in range(40)}
    for updates, removals in steps:
        before = dict(vm)
        vm2 = vm.updated(updates, removals, rebase=shared if rebase else None)
        model.update(updates)
        for name in removals:
            model.pop(name, None)
        assert dict(vm2) == model and len(vm2) == len(model)
        assert all(vm2.get(k) == v and k in vm2 for k, v in model.items())
        assert all(k not in vm2 and vm2.get(k) is None for k in shared if k not in model)
        assert dict(vm) == before, "the old map must not change"
        vm = vm2


def test_version_map_shares_and_folds() -> None:
    base = {f"r{i}": "1" for i in range(10_000)}
    vm = EMPTY_VERSIONS.updated(base)
    assert vm._base is base  # the first response's versions are adopted, not copied
    assert VersionMap.of(vm) is vm
    for i in range(150):
        vm = vm.updated({f"r{i}": "2"})
    assert vm._base is base and len(vm._over) == 150  # differences only
    for i in range(150, 300):
        vm = vm.updated({f"r{i}": "2"})
    # Folded into a fresh base once they outgrew 64 + sqrt(n) = 164: the differences stay bounded.
    assert vm._base is not base and len(vm._over) == 300 - 165
    shared = {**base, **{f"r{i}": "2" for i in range(400)}}
    rebased = vm
    for i in range(300, 400):
        rebased = rebased.updated({f"r{i}": "2"}, rebase=shared)
    assert rebased._base is shared and not rebased._over and not rebased._gone  # back on the shared base
    assert dict(rebased) == shared


def test_evolve_is_replace() -> None:
    w = st.WatchState(CDS, names=frozenset({"a"}), nonce_sent="n1")
    assert st.evolve(w, nonce_acked="n1", last_error="") == st.WatchState(
        CDS, names=frozenset({"a"}), nonce_sent="n1", nonce_acked="n1"
    )
    with pytest.raises(TypeError, match="no field"):
        st.evolve(w, nonsense=1)


# -- encoded Delta responses ------------------------------------------------------------------------------------


def cluster(name: str, ms: int = 1000) -> Resource:
    msg = cluster_pb2.Cluster(name=name)
    msg.connect_timeout.FromMilliseconds(ms)
    return Resource.pack(name, msg, aliases=(f"alias-{name}",))


def test_delta_wire_is_one_resources_entry() -> None:
    res = cluster("a")
    parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(res.delta_wire * 2)
    assert [r.name for r in parsed.resources] == ["a", "a"]
    assert parsed.resources[0] == res.delta


def _scripted(encode: bool) -> list[discovery_pb2.DeltaDiscoveryResponse]:
    """The same script of requests and cache changes, answered by one stream; responses as messages."""
    cache = SnapshotCache()
    cache.set_resources(CDS, [cluster(n) for n in "abcde"])
    counter = itertools.count()
    stream = DeltaStream(cache.view([]), nonces=lambda: f"n{next(counter)}", control_plane="cp", encode=encode)
    out: list[discovery_pb2.DeltaDiscoveryResponse] = []

    def collect(responses: tuple[object, ...]) -> str:
        for resp in responses:
            if encode:
                assert isinstance(resp, EncodedDeltaResponse)
                out.append(discovery_pb2.DeltaDiscoveryResponse.FromString(resp.SerializeToString()))
            else:
                assert isinstance(resp, discovery_pb2.DeltaDiscoveryResponse)
                out.append(resp)
        return out[-1].nonce if responses else ""

    nonce = collect(stream.handle_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS), NOW).responses)
    stream.handle_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, response_nonce=nonce), NOW)
    changed = cache.set_resources(CDS, [cluster("a", 5), cluster("b"), cluster("f")])
    nonce = collect(stream.handle_change(Change(CDS, "", changed, cache.revision), NOW))
    stream.handle_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, response_nonce=nonce), NOW)
    req = discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, resource_names_subscribe=["alias-b", "zz"])
    collect(stream.handle_request(req, NOW).responses)
    w = stream.watch_state(CDS)
    assert w is not None and dict(w.sent) == {"a": cluster("a", 5).version, "b": cluster("b").version,
                                              "f": cluster("f").version}  # fmt: skip
    return out


def test_encoded_responses_equal_the_plain_ones() -> None:
    plain, encoded = _scripted(False), _scripted(True)
    assert encoded == plain
    assert [len(r.resources) for r in plain] == [5, 2, 1]
    assert list(plain[1].removed_resources) == ["c", "d", "e"]
    assert list(plain[2].removed_resources) == ["zz"]


def test_encoded_response_reads_like_a_message() -> None:
    cache = SnapshotCache()
    cache.set_resources(CDS, [cluster("a"), cluster("b")])
    stream = DeltaStream(cache.view([]), nonces=lambda: "n1", encode=True)
    (resp,) = stream.handle_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS), NOW).responses
    assert isinstance(resp, EncodedDeltaResponse)
    assert (resp.type_url, resp.nonce, resp.resource_count) == (CDS, "n1", 2)
    assert [r.name for r in resp.resources] == ["a", "b"]  # decoded on demand


def test_fresh_wildcard_streams_share_one_full_set() -> None:
    cache = SnapshotCache()
    cache.set_resources(CDS, [cluster(f"c{i}") for i in range(500)])
    streams = [DeltaStream(cache.view([]), encode=True) for _ in range(3)]
    bodies = []
    for s in streams:
        (resp,) = s.handle_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS), NOW).responses
        bodies.append(resp._body)
        s.handle_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, response_nonce=resp.nonce), NOW)
    assert bodies[0] is bodies[1] is bodies[2]  # joined once
    bases = {id(s.watch_state(CDS).sent._base) for s in streams} | {id(s.watch_state(CDS).acked._base) for s in streams}
    assert bases == {id(cache.full_set(CDS).versions)}  # one name -> version dict for every stream
    # A change bumps the revision: a new full set, and the old one is not reused.
    cache.upsert(CDS, [cluster("c0", 7)])
    assert cache.full_set(CDS).versions["c0"] == cluster("c0", 7).version
