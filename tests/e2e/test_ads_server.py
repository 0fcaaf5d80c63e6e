"""ADS end to end: who may connect (TLS authn, identity vs node, node types), Envoy streams served per proxy,
debug scoping on the TLS port, and the push throttle. Real gRPC against an in-process ztd."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import message, struct_pb2

from tests.e2e.ads_client import ADDRESS, AUTHORIZATION, sotw_exchange, ztunnel, ztunnel_node
from tests.helpers import RunningZtd, bearer, make_csr, new_key, request, running_ztd
from tests.support.wait import eventually
from tests.support.ztunnel_ads import EXAMPLES, syncz_over_xds
from xds_server import main as ztd_main
from ztcore.envoy import Proxy
from ztcore.mesh.translate import Translation
from ztcore.xds import status as st
from ztcore.xds import typeurls

MESH_ZTUNNEL = "istio-system/ztunnel"


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
    return grpc.aio.insecure_channel(f"127.0.0.1:{zt.cfg.xds_port}")


# Streams expected to be refused send a single first request: a client still writing when the server ends the
# call may see its own write fail (INTERNAL) instead of the server's status.
ONE = {"types": [ADDRESS]}


async def first_error(client: Any) -> grpc.aio.AioRpcError:
    err = await client.wait_closed()
    assert err is not None, "the stream should have been refused"
    return err


# -- authentication on the TLS port ----------------------------------------------------------------------------


async def test_tls_port_refuses_unauthenticated_streams(zt: RunningZtd) -> None:
    async with zt.secure_channel() as ch, ztunnel(ch, **ONE) as client:
        err = await first_error(client)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "authentication failure"


async def test_tls_port_accepts_a_token_of_the_nodes_namespace(zt: RunningZtd) -> None:
    token = zt.token(MESH_ZTUNNEL, pod="ztunnel-node-a")
    async with zt.secure_channel() as ch, ztunnel(ch, metadata=bearer(token)) as client:
        got = {(await client.next()).response.type_url for _ in range(2)}
    assert got == {ADDRESS, AUTHORIZATION}


async def test_streams_on_the_tls_port_show_the_clients_own_address(zt: RunningZtd) -> None:
    """Not the TLS front's relay connection: logs, syncz and proxy-status name the client as it connected."""
    token = zt.token(MESH_ZTUNNEL, pod="ztunnel-node-a")
    async with zt.secure_channel() as ch, ztunnel(ch, metadata=bearer(token)) as client:
        await client.next()
        # this test's one connection to the TLS port: its local port is the client's
        ss = await asyncio.to_thread(
            subprocess.run, ["ss", "-tnH", "state", "established", f"( dport = :{zt.cfg.secure_port} )"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        (local,) = [line.split()[2] for line in ss.stdout.splitlines()]  # 127.0.0.1:P or [::ffff:127.0.0.1]:P
        host, _, port = local.rpartition(":")
        client_side = f"{host.strip('[]').removeprefix('::ffff:')}:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{zt.cfg.monitoring_port}/debug/syncz") as resp:
                syncz = await resp.json()
    assert [row["peer"] for row in syncz] == [f"ipv4:{client_side}"]


async def test_tls_port_refuses_an_identity_of_another_namespace(zt: RunningZtd) -> None:
    token = zt.token("shop/frontend")
    async with zt.secure_channel() as ch, ztunnel(ch, metadata=bearer(token), **ONE) as client:
        err = await first_error(client)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://cluster.local/ns/shop/sa/frontend" in (err.details() or "")
    assert "istio-system" in (err.details() or "")


async def test_tls_port_accepts_a_client_certificate(zt: RunningZtd) -> None:
    key = new_key()
    async with zt.secure_channel() as ch:
        resp = await zt.ca(ch).CreateCertificate(
            request(make_csr(key)), metadata=bearer(zt.token(MESH_ZTUNNEL, pod="ztunnel-node-a"))
        )
    chain = "".join(resp.cert_chain[:-1]).encode()
    async with zt.secure_channel(key, chain) as ch, ztunnel(ch) as client:
        assert (await client.next()).response.resources


async def test_tls_port_rejects_a_bad_token(zt: RunningZtd) -> None:
    async with zt.secure_channel() as ch, ztunnel(ch, metadata=bearer("not.a.jwt"), **ONE) as client:
        err = await first_error(client)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_xds_auth_off_lets_anonymous_streams_through(tmp_path: Path, mesh: Path) -> None:
    async with running_ztd(tmp_path, config_dir=mesh, xds_auth=False) as z:
        async with z.secure_channel() as ch, ztunnel(ch) as client:
            assert (await client.next()).response.resources


# -- node types ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node_id", "message"),
    [
        ("waypoint~10.0.0.1~wp.shop~shop.svc.cluster.local", "node type 'waypoint' is not served by ztd"),
        ("gateway~10.0.0.1~gw.shop~shop.svc.cluster.local", "invalid node type 'gateway'"),
        ("just-a-name", "is not <type>~<ip>~<pod>.<namespace>~<domain>"),
        ("ztunnel~not-an-ip~z.istio-system~istio-system.svc.cluster.local", "no valid IP address"),
        ("", "carries no node id"),
    ],
)
async def test_unknown_nodes_are_invalid_argument(zt: RunningZtd, node_id: str, message: str) -> None:
    async with plain(zt) as ch, ztunnel(ch, node=base_pb2.Node(id=node_id), **ONE) as client:
        err = await first_error(client)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.details() or ""), err.details()


async def test_unknown_type_url_is_invalid_argument(zt: RunningZtd) -> None:
    bogus = "type.googleapis.com/no.such.Type"
    async with plain(zt) as ch:
        async with ztunnel(ch, types=[bogus]) as client:
            err = await first_error(client)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no.such.Type" in (err.details() or "")
        # Later in a stream that started well: the same refusal.
        async with ztunnel(ch) as client:
            await client.next()
            client.send(discovery_pb2.DeltaDiscoveryRequest(type_url=bogus, resource_names_subscribe=["x"]))
            err = await first_error(client)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no.such.Type" in (err.details() or "")


# -- Envoy streams: resources per proxy from the generator -------------------------------------------------------


def fake_generator(translation: Translation, proxy: Proxy) -> Mapping[str, Sequence[message.Message]]:
    """Real Envoy messages that depend on the proxy (its namespace) and on the registry (one per service)."""
    clusters = [cluster_pb2.Cluster(name=f"outbound|{s.key}") for s in translation.services]
    clusters.append(cluster_pb2.Cluster(name=f"self|{proxy.namespace}/{proxy.pod_name}"))
    listeners = [listener_pb2.Listener(name=f"{proxy.ip}_15006")]
    return {typeurls.CLUSTER: clusters, typeurls.LISTENER: listeners}


def sidecar(pod: str, namespace: str, ip: str, kind: str = "sidecar") -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": namespace, "NAME": pod, "INSTANCE_IPS": ip, "CLUSTER_ID": "Kubernetes"})
    return base_pb2.Node(id=f"{kind}~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local", metadata=meta)


def names(resp: discovery_pb2.DiscoveryResponse, cls: Any) -> list[str]:
    out = []
    for res in resp.resources:
        msg = cls()
        assert res.Unpack(msg)
        out.append(msg.name)
    return out


async def test_envoy_streams_get_their_own_resources(
    tmp_path: Path, mesh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ztd_main, "load_generator", lambda: fake_generator)
    async with running_ztd(tmp_path, config_dir=mesh) as z, plain(z) as ch:
        a_req = discovery_pb2.DiscoveryRequest(
            node=sidecar("frontend-1", "shop", "10.244.1.10"), type_url=typeurls.CLUSTER
        )
        b_req = discovery_pb2.DiscoveryRequest(node=sidecar("ledger-1", "payments", "10.244.1.20", "router"),
                                               type_url=typeurls.CLUSTER)  # fmt: skip
        a, a_queue = await sotw_exchange(ch, [a_req])
        b, b_queue = await sotw_exchange(ch, [b_req])
        a_resp, b_resp = await asyncio.wait_for(a.read(), 5), await asyncio.wait_for(b.read(), 5)
        services = [
            "outbound|payments/ledger.payments.svc.cluster.local",
            "outbound|shop/cart.shop.svc.cluster.local",
            "outbound|shop/frontend.shop.svc.cluster.local",
        ]
        assert names(a_resp, cluster_pb2.Cluster) == [*services, "self|shop/frontend-1"]
        assert names(b_resp, cluster_pb2.Cluster) == [*services, "self|payments/ledger-1"]
        # The listener type is per proxy too.
        a_queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=typeurls.CLUSTER, response_nonce=a_resp.nonce,
                                                          version_info=a_resp.version_info))  # fmt: skip
        a_queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=typeurls.LISTENER))
        lds = await asyncio.wait_for(a.read(), 5)
        assert names(lds, listener_pb2.Listener) == ["10.244.1.10_15006"]
        a_queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=typeurls.LISTENER, response_nonce=lds.nonce,
                                                          version_info=lds.version_info))  # fmt: skip
        b_queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=typeurls.CLUSTER, response_nonce=b_resp.nonce,
                                                          version_info=b_resp.version_info))  # fmt: skip
        acks = {"frontend-1.shop": (typeurls.CLUSTER, typeurls.LISTENER), "ledger-1.payments": (typeurls.CLUSTER,)}

        def acked() -> bool:
            held = {stream.node.id.split("~")[2]: stream.statuses() for stream in z.ztd.xds_streams.streams()}
            return all(
                t in held.get(node, {}) and held[node][t].status == st.SYNCED for node, ts in acks.items() for t in ts
            )

        await eventually(acked, within=5, what="both proxies' ACKs recorded")
        # A registry change rebuilds every proxy; SotW CDS carries the full set again.
        shop = mesh / "20-shop.yaml"
        shop.write_text(shop.read_text().replace("name: cart\n  namespace: shop", "name: basket\n  namespace: shop"))
        a_push = await asyncio.wait_for(a.read(), 5)
        assert a_push.type_url == typeurls.CLUSTER
        assert "outbound|shop/basket.shop.svc.cluster.local" in names(a_push, cluster_pb2.Cluster)
        assert "outbound|shop/cart.shop.svc.cluster.local" not in names(a_push, cluster_pb2.Cluster)
        assert "outbound|shop/basket.shop.svc.cluster.local" in names(await asyncio.wait_for(b.read(), 5),
                                                                      cluster_pb2.Cluster)  # fmt: skip
        # syncz lists both proxies, with istiod's five Envoy types.
        configs = await syncz_over_xds(ch)
        assert [c.node.id for c in configs] == ["frontend-1.shop", "ledger-1.payments"]
        statuses = {(g.type_url, g.config_status) for g in configs[0].generic_xds_configs}
        assert (typeurls.LISTENER, 1) in statuses and (typeurls.ENDPOINT, 2) in statuses  # SYNCED, NOT_SENT
        assert len(z.ztd.xds_cache.scopes()) == 2
        for q, call in ((a_queue, a), (b_queue, b)):
            q.put_nowait(None)
            call.cancel()
        await eventually(
            lambda: not z.ztd.xds_cache.scopes(),
            within=5,
            what="closed proxies' scopes gone",
        )


async def test_envoy_builder_refusal_is_the_streams_error(zt: RunningZtd) -> None:
    """The installed builder serves sidecars only: a router is refused with its reason."""
    node = sidecar("gw", "shop", "10.244.9.9", "router")
    async with plain(zt) as ch:
        call, queue = await sotw_exchange(ch, [discovery_pb2.DiscoveryRequest(node=node, type_url=typeurls.CLUSTER)])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        queue.put_nowait(None)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "router" in (err.value.details() or "")


# -- debug on the TLS port ----------------------------------------------------------------------------------------


async def test_debug_on_tls_port_is_scoped_to_the_callers_namespace(zt: RunningZtd) -> None:
    async with plain(zt) as ch, ztunnel(ch) as client:
        await client.next()
        async with zt.secure_channel() as sch:
            system = await syncz_over_xds(sch, bearer(zt.token("istio-system/default")))
            shop = await syncz_over_xds(sch, bearer(zt.token("shop/frontend")))
            call, queue = await sotw_exchange(sch, [discovery_pb2.DiscoveryRequest(type_url=typeurls.DEBUG_SYNCZ)])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(call.read(), 5)
            queue.put_nowait(None)
    assert [c.node.id for c in system] == ["ztunnel-node-a.istio-system"]
    assert shop == []
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_unknown_debug_type_is_invalid_argument(zt: RunningZtd) -> None:
    async with plain(zt) as ch:
        req = discovery_pb2.DiscoveryRequest(type_url="istio.io/debug/adsz")
        call, queue = await sotw_exchange(ch, [req])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        queue.put_nowait(None)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "syncz" in (err.value.details() or "")


async def test_delta_debug_syncz(zt: RunningZtd) -> None:
    """Newer istioctl asks over Delta: the same ClientConfigs, named by proxy id."""
    async with plain(zt) as ch, ztunnel(ch) as client:
        await client.next()
        debug = ztunnel_node("10.0.0.9", "istioctl-1")
        async with ztunnel(ch, node=debug, types=[typeurls.DEBUG_SYNCZ]) as istioctl:
            resp = (await istioctl.next(typeurls.DEBUG_SYNCZ)).response
    assert [r.name for r in resp.resources] == ["ztunnel-node-a.istio-system"]


# -- throttle --------------------------------------------------------------------------------------------------------


async def test_push_throttle_of_one_still_serves_every_client(tmp_path: Path, mesh: Path) -> None:
    async with running_ztd(tmp_path, config_dir=mesh, push_throttle=1) as z, plain(z) as ch:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(ztunnel(ch, node=ztunnel_node(f"10.244.3.{i + 1}", f"ztunnel-{i}")))
                for i in range(5)
            ]
            for c in clients:
                assert {(await c.next()).response.type_url for _ in range(2)} == {ADDRESS, AUTHORIZATION}
            shop = mesh / "20-shop.yaml"
            shop.write_text(shop.read_text().replace("version: v1}", "version: v3}", 1))
            for c in clients:
                assert (await c.next(ADDRESS)).response.resources


def test_key_material_never_in_debug(tmp_path: Path) -> None:
    """The ADS never serves secrets; the config dump skips the type even if a stream asked for it."""
    from xds_server.debug import config_dump

    class Info:
        node = base_pb2.Node(id="sidecar~10.0.0.1~a.shop~shop.svc.cluster.local")

        @staticmethod
        def statuses() -> dict[str, Any]:
            from ztcore.xds.status import WatchState

            return {typeurls.SECRET: WatchState(typeurls.SECRET, sent={"default": "1"})}

    assert config_dump(Info(), lambda t, n: None, "Kubernetes") == []  # type: ignore[arg-type]
