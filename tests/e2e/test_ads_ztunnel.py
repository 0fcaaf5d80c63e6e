"""ADS end to end for ztunnel-style clients: real gRPC to an in-process ztd serving a copy of examples/mesh.

The client is ztunnel-faithful (tests/e2e/ads_client.py): Delta ADS, node `ztunnel~…`, wildcard or on-demand
subscriptions, every response ACKed (or NACKed), reconnects with initial_resource_versions. What it receives
is compared with an independent computation from `translate()` of the same folder.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2

from tests.e2e.ads_client import ADDRESS, AUTHORIZATION, ZtunnelClient, decode, sotw_exchange, ztunnel, ztunnel_node
from tests.helpers import RunningZtd, running_ztd
from tests.support.ztunnel_ads import EXAMPLES, syncz_over_xds
from ztcore.mesh.registry.files import read_dir
from ztcore.mesh.registry.store import RegistrySnapshot
from ztcore.mesh.translate import TranslateOptions, translate
from ztcore.xds import typeurls
from ztcore.xds.resources import content_version

FRONTEND_1 = "Kubernetes//Pod/shop/frontend-1"
FRONTEND_SVC = "shop/frontend.shop.svc.cluster.local"


def expected(config_dir: Path) -> dict[str, dict[str, tuple[str, tuple[str, ...], Any]]]:
    """type URL -> name -> (version, aliases, message), computed from translate() without the server."""
    translation = translate(RegistrySnapshot(read_dir(config_dir).objects), TranslateOptions())
    out: dict[str, dict[str, tuple[str, tuple[str, ...], Any]]] = {ADDRESS: {}, AUTHORIZATION: {}}

    def add(type_url: str, name: str, aliases: tuple[str, ...], msg: Any) -> None:
        packed = any_pb2.Any()
        packed.Pack(msg, deterministic=True)
        out[type_url][name] = (content_version(type_url, packed.value), aliases, msg)

    for w in translation.workloads:
        add(ADDRESS, w.uid, tuple(f"/{ip}" for ip in w.addresses), w.to_address_pb())
    for s in translation.services:
        add(ADDRESS, s.key, tuple(f"/{a.address}" for a in s.addresses), s.to_address_pb())
    for a in translation.authorizations:
        add(AUTHORIZATION, a.key, (), a.to_pb())
    return out


def assert_matches(client: ZtunnelClient, want: dict[str, dict[str, tuple[str, tuple[str, ...], Any]]]) -> None:
    for type_url, resources in want.items():
        store = client.stores[type_url]
        assert sorted(store) == sorted(resources), typeurls.short_name(type_url)
        for name, (version, _, msg) in resources.items():
            assert store[name] == (version, msg), name


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    target = tmp_path / "mesh"
    shutil.copytree(EXAMPLES, target)
    return target


@pytest.fixture
async def zt(tmp_path: Path, mesh: Path) -> AsyncIterator[RunningZtd]:
    async with running_ztd(tmp_path, config_dir=mesh) as running:
        yield running


def plain(zt: RunningZtd) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{zt.cfg.xds_port}", options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    )


async def test_wildcard_receives_exactly_the_translation(zt: RunningZtd, mesh: Path) -> None:
    want = expected(mesh)
    async with plain(zt) as ch, ztunnel(ch) as client:
        by_type = {r.response.type_url: r.response for r in [await client.next(), await client.next()]}
        assert set(by_type) == {ADDRESS, AUTHORIZATION}
        assert_matches(client, want)
        # Aliases are the on-demand keys `<network>/<ip>`, sent with each resource.
        assert {r.name: tuple(r.aliases) for r in by_type[ADDRESS].resources} == {
            name: aliases for name, (_, aliases, _) in want[ADDRESS].items()
        }
        assert not by_type[ADDRESS].removed_resources and not by_type[AUTHORIZATION].removed_resources
        assert not await client.quiet(0.3), "an ACK must not trigger another response"
    # A second ztunnel (the other node) gets the very same resources and versions.
    node_b = ztunnel_node("10.244.2.2", "ztunnel-node-b", node_name="node-b")
    async with plain(zt) as ch, ztunnel(ch, node=node_b) as other:
        await other.next()
        await other.next()
        assert_matches(other, want)


async def test_on_demand_by_ip_uid_and_hostname(zt: RunningZtd) -> None:
    async with plain(zt) as ch, ztunnel(ch, on_demand=True) as client:
        # ztunnel's XDS_ON_DEMAND start: "*" subscribed and unsubscribed at once = nothing.
        empty = (await client.next(ADDRESS)).response
        assert not empty.resources and not empty.removed_resources
        policies = (await client.next(AUTHORIZATION)).response
        assert policies.resources  # policies stay wildcard

        def ask(*names: str) -> None:
            client.send(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS, resource_names_subscribe=list(names)))

        ask("/10.244.1.10")
        got = (await client.next(ADDRESS)).response
        assert [(r.name, list(r.aliases)) for r in got.resources] == [(FRONTEND_1, ["/10.244.1.10"])]
        assert decode(ADDRESS, got.resources[0]).workload.name == "frontend-1"

        ask("Kubernetes//Pod/payments/ledger-2")
        got = (await client.next(ADDRESS)).response
        assert [r.name for r in got.resources] == ["Kubernetes//Pod/payments/ledger-2"]

        ask(FRONTEND_SVC)
        got = (await client.next(ADDRESS)).response
        assert [r.name for r in got.resources] == [FRONTEND_SVC]
        assert decode(ADDRESS, got.resources[0]).service.hostname == "frontend.shop.svc.cluster.local"

        # A service VIP is an alias too.
        ask("/10.96.20.1")
        got = (await client.next(ADDRESS)).response
        assert [r.name for r in got.resources] == ["payments/ledger.payments.svc.cluster.local"]

        # Names that do not exist come back as removed, so ztunnel stops waiting for them.
        ask("/10.9.9.9", "Kubernetes//Pod/shop/ghost")
        got = (await client.next(ADDRESS)).response
        assert not got.resources
        assert sorted(got.removed_resources) == ["/10.9.9.9", "Kubernetes//Pod/shop/ghost"]

        # Subscribing again to a held name resends it (the spec requires it).
        ask("/10.244.1.10")
        got = (await client.next(ADDRESS)).response
        assert [r.name for r in got.resources] == [FRONTEND_1]
        assert sorted(client.stores[ADDRESS]) == sorted(
            [
                FRONTEND_1,
                "Kubernetes//Pod/payments/ledger-2",
                FRONTEND_SVC,
                "payments/ledger.payments.svc.cluster.local",
            ]
        )
        # Unsubscribing needs no answer.
        client.send(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS, resource_names_unsubscribe=[FRONTEND_SVC]))
        assert not await client.quiet(0.3)


async def test_reconnect_with_initial_versions_resends_nothing_unchanged(zt: RunningZtd, mesh: Path) -> None:
    async with plain(zt) as ch, ztunnel(ch) as client:
        await client.next()
        await client.next()
        held = client.versions()
    # A reconnect listing what it holds: nothing is resent, nothing is removed.
    async with plain(zt) as ch, ztunnel(ch, initial=held) as again:
        for _ in range(2):
            resp = (await again.next()).response
            assert not resp.resources and not resp.removed_resources, typeurls.short_name(resp.type_url)
    # One stale version and one name that no longer exists: only those two are corrected.
    stale = {t: dict(v) for t, v in held.items()}
    stale[ADDRESS][FRONTEND_1] = "0000000000000000"
    stale[ADDRESS]["Kubernetes//Pod/shop/long-gone"] = "1111111111111111"
    async with plain(zt) as ch, ztunnel(ch, initial=stale) as third:
        by_type = {r.response.type_url: r.response for r in [await third.next(), await third.next()]}
        assert [r.name for r in by_type[ADDRESS].resources] == [FRONTEND_1]
        assert r_version(by_type[ADDRESS]) == held[ADDRESS][FRONTEND_1]
        assert list(by_type[ADDRESS].removed_resources) == ["Kubernetes//Pod/shop/long-gone"]
        assert not by_type[AUTHORIZATION].resources and not by_type[AUTHORIZATION].removed_resources
    # Versions are content hashes: a restarted ztd serving the same folder has the same ones.
    assert held == {t: {n: v for n, (v, _, _) in r.items()} for t, r in expected(mesh).items()}


def r_version(resp: discovery_pb2.DeltaDiscoveryResponse) -> str:
    return str(resp.resources[0].version)


async def test_registry_edits_reach_the_client_within_a_second(zt: RunningZtd, mesh: Path) -> None:
    async with plain(zt) as ch, ztunnel(ch) as client:
        await client.next()
        await client.next()
        before = client.versions()

        # Relabel frontend-1's version: its workload (canonical revision) changes, nothing else does.
        shop = mesh / "20-shop.yaml"
        text = shop.read_text()
        assert text.count("labels: {app: frontend, version: v1}") == 2
        edited = text.replace("labels: {app: frontend, version: v1}", "labels: {app: frontend, version: v2}", 1)
        started = time.monotonic()
        shop.write_text(edited)
        got = await client.next(ADDRESS, within=5)
        assert got.at - started < 1.0, f"change arrived after {got.at - started:.2f}s"
        assert [r.name for r in got.response.resources] == [FRONTEND_1]
        assert decode(ADDRESS, got.response.resources[0]).workload.canonical_revision == "v2"
        assert_matches(client, expected(mesh))
        after = client.versions()
        changed = {n for n in after[ADDRESS] if after[ADDRESS][n] != before[ADDRESS].get(n)}
        assert changed == {FRONTEND_1}  # every other resource kept its version

        # Deleting a pod and a policy: removed_resources, again within a second.
        payments = mesh / "30-payments.yaml"
        docs = payments.read_text().split("\n---\n")
        kept = [d for d in docs if "name: ledger-2" not in d]
        assert len(kept) == len(docs) - 1
        authz = mesh / "40-authorization.yaml"
        policy_docs = authz.read_text().split("\n---\n")
        policy_kept = [d for d in policy_docs if "name: deny-debug" not in d]
        started = time.monotonic()
        payments.write_text("\n---\n".join(kept))
        authz.write_text("\n---\n".join(policy_kept))
        removed: set[str] = set()
        while {"Kubernetes//Pod/payments/ledger-2", "payments/deny-debug"} - removed:
            item = await client.next(within=5)
            removed.update(item.response.removed_resources)
        assert time.monotonic() - started < 1.5
        assert_matches(client, expected(mesh))


async def test_a_bad_edit_keeps_the_last_good_configuration(zt: RunningZtd, mesh: Path) -> None:
    async with plain(zt) as ch, ztunnel(ch) as client:
        await client.next()
        await client.next()
        (mesh / "99-broken.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: shop}\n"
                                               "status: {podIP: not-an-ip}\n")  # fmt: skip
        assert not await client.quiet(1.2)
        assert_matches(client, expected(EXAMPLES))


async def test_nack_is_recorded_and_shown_in_syncz(zt: RunningZtd) -> None:
    async with plain(zt) as ch:
        client = ZtunnelClient(ch, reject=lambda resp: "unknown scope 7" if resp.type_url == AUTHORIZATION else "")
        await client.start()
        try:
            by_type = {r.response.type_url: r for r in [await client.next(), await client.next()]}
            assert by_type[AUTHORIZATION].nacked == "unknown scope 7" and not by_type[ADDRESS].nacked
            await asyncio.sleep(0.1)
            configs = await syncz_over_xds(ch)
            assert [c.node.id for c in configs] == ["ztunnel-node-a.istio-system"]
            by_type = {g.type_url: g for g in configs[0].generic_xds_configs}
            assert by_type[AUTHORIZATION].config_status == csds_pb2.ConfigStatus.ERROR
            assert by_type[AUTHORIZATION].error_state.details == "unknown scope 7"
            assert by_type[ADDRESS].config_status == csds_pb2.ConfigStatus.SYNCED
            # A ztunnel does not use Envoy's types: istiod reports them UNKNOWN.
            assert by_type[typeurls.CLUSTER].config_status == csds_pb2.ConfigStatus.UNKNOWN
            meta = configs[0].node.metadata.fields
            assert (meta["CLUSTER_ID"].string_value, meta["NAMESPACE"].string_value) == ("Kubernetes", "istio-system")
            assert meta["ISTIO_VERSION"].string_value == "1.28.0"

            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{zt.cfg.monitoring_port}/debug/syncz"
                async with http.get(url) as resp:
                    assert resp.status == 200
                    entries = await resp.json()
            assert entries[0]["proxy"] == "ztunnel-node-a.istio-system"
            assert entries[0]["types"]["WADS"]["status"] == "ERROR"
            assert entries[0]["types"]["WADS"]["last_error"] == "unknown scope 7"
            assert entries[0]["types"]["WDS"]["status"] == "SYNCED"
        finally:
            await client.close()


async def test_config_dump_over_xds_and_http(zt: RunningZtd, mesh: Path) -> None:
    async with plain(zt) as ch, ztunnel(ch) as client:
        await client.next()
        await client.next()
        await asyncio.sleep(0.1)
        req = discovery_pb2.DiscoveryRequest(
            type_url=typeurls.DEBUG_CONFIG_DUMP, resource_names=["ztunnel-node-a.istio-system"]
        )
        call, queue = await sotw_exchange(ch, [req])
        resp = await asyncio.wait_for(call.read(), 5)
        queue.put_nowait(None)
        call.cancel()
        assert len(resp.resources) == 1
        dump = csds_pb2.ClientConfig()
        assert resp.resources[0].Unpack(dump)
        held = {(g.type_url, g.name): g.version_info for g in dump.generic_xds_configs}
        want = expected(mesh)
        assert held == {(t, n): v for t, r in want.items() for n, (v, _, _) in r.items()}
        assert all(g.config_status == csds_pb2.ConfigStatus.SYNCED for g in dump.generic_xds_configs)

        # Unknown proxy: a clear NOT_FOUND, not an empty answer.
        req = discovery_pb2.DiscoveryRequest(type_url=typeurls.DEBUG_CONFIG_DUMP, resource_names=["nobody.shop"])
        call, queue = await sotw_exchange(ch, [req])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no proxy 'nobody.shop'" in (err.value.details() or "")

        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{zt.cfg.monitoring_port}/debug/config_dump"
            async with http.get(base, params={"proxyID": "ztunnel-node-a.istio-system"}) as r:
                assert r.status == 200
                body = await r.json()
            configs = body["configs"]
            assert configs[0]["@type"] == "type.googleapis.com/envoy.service.status.v3.ClientConfig"
            names = {g["name"] for g in configs[0]["genericXdsConfigs"]}
            assert FRONTEND_1 in names and "payments/deny-debug" in names
            async with http.get(base) as r:
                assert r.status == 400
            async with http.get(base, params={"proxyID": "nobody.shop"}) as r:
                assert r.status == 404
                assert "nobody.shop" in (await r.json())["error"]


async def test_sotw_address_client(zt: RunningZtd, mesh: Path) -> None:
    want = expected(mesh)
    node = ztunnel_node()
    async with plain(zt) as ch:
        call, queue = await sotw_exchange(ch, [discovery_pb2.DiscoveryRequest(node=node, type_url=ADDRESS)])
        resp = await asyncio.wait_for(call.read(), 5)
        assert resp.type_url == ADDRESS and resp.version_info and resp.nonce
        got = {}
        for res in resp.resources:
            address = decode(ADDRESS, discovery_pb2.Resource(name="", resource=res))
            got[address.workload.uid or f"{address.service.namespace}/{address.service.hostname}"] = address
        assert got == {name: msg for name, (_, _, msg) in want[ADDRESS].items()}
        queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=ADDRESS, response_nonce=resp.nonce,
                                                        version_info=resp.version_info))  # fmt: skip
        pending = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({pending}, timeout=0.3)
        assert not done, "an ACK gets no answer"
        # A change: SotW resends the whole state.
        shop = mesh / "20-shop.yaml"
        shop.write_text(shop.read_text().replace("version: v1}", "version: v9}", 1))
        pushed = await asyncio.wait_for(pending, 5)
        assert len(pushed.resources) == len(want[ADDRESS]) and pushed.version_info != resp.version_info
        queue.put_nowait(None)
        call.cancel()
