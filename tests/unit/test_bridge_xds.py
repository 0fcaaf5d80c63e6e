"""The bridge's Delta ADS client against ztd's real ADS server (in-process ztd, real gRPC, TLS port + token).

Checked: the bridge's view from xDS equals the view from the same YAML folder; a policy change and a
workload deletion arrive as deltas; a reconnect sends initial_resource_versions and the server then sends
only what changed while the client was away; a resource the handler rejects is NACKed by name.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2

from ipsec_bridge.pairs import pod_pairs
from ipsec_bridge.state import NodeView, Rejected, StateStore, TypeHandler
from ipsec_bridge.xds_client import DeltaXdsClient, XdsClientOptions, build_node
from tests.helpers import running_ztd
from tests.support.bridge_mesh import DENY_FRONTEND_TO_LEDGER, PODS, POLICIES, load_view, settings, write_mesh
from ztcore.xds import typeurls


async def wait_for(store: StateStore, predicate: Any, seconds: float = 10) -> NodeView:
    async with asyncio.timeout(seconds):
        while True:
            view = store.view
            if predicate(view):
                return view
            await store.wait_changed(view.version, wait_s=0.5)


async def poll(predicate: Any, seconds: float = 5) -> None:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"not true within {seconds}s")


def summary(view: NodeView) -> tuple[Any, ...]:
    return (
        {str(ip): (p.identity.uri, p.node) for ip, p in view.pods_by_ip.items()},
        {k: str(v) for k, v in view.node_addresses.items()},
        tuple(a.key for a in view.authorizations),
        {(str(k[0]), str(k[1])): p.initiator for k, p in pod_pairs(view, "node-a")[0].items()},
    )


@contextlib.asynccontextmanager
async def client(store: StateStore, options: XdsClientOptions, handlers: Any = None) -> AsyncIterator[DeltaXdsClient]:
    store.expect_types([typeurls.ADDRESS, typeurls.AUTHORIZATION])
    xds = DeltaXdsClient(options, handlers or store.handlers())
    task = asyncio.create_task(xds.run())
    try:
        yield xds
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_view_from_xds_equals_the_view_from_the_folder_and_follows_changes(tmp_path: Path) -> None:
    folder = write_mesh(tmp_path / "mesh")
    from_files = (await load_view(folder)).view
    async with running_ztd(tmp_path, config_dir=folder) as rz:
        token = tmp_path / "token"
        token.write_text(rz.token("istio-system/ztunnel", node="node-a"))
        options = XdsClientOptions(
            address=f"127.0.0.1:{rz.cfg.secure_port}",
            node_name="node-a",
            node_ip="192.168.50.1",
            root_cert=rz.cfg.published_root,
            token_file=token,
        )
        store = StateStore(settings())
        async with client(store, options) as xds:
            view = await wait_for(store, lambda v: v.synced)
            assert summary(view) == summary(from_files)
            assert xds.status.connected and xds.status.nacks == 0

            # a policy that refuses frontend -> ledger, and the deletion of b2: both arrive as deltas
            (folder / "policies.yaml").write_text(POLICIES + DENY_FRONTEND_TO_LEDGER)
            pods = {k: v for k, v in PODS.items() if k != "b2"}
            write_mesh(folder, POLICIES + DENY_FRONTEND_TO_LEDGER, pods)
            view = await wait_for(store, lambda v: "payments/deny-frontend" in {a.key for a in v.authorizations}
                                  and len(v.pods_by_ip) == 3)  # fmt: skip
            admitted, _ = pod_pairs(view, "node-a")
            # a1<->b1 still admitted: ledger may reach frontend (a1 has no policy); only one direction is refused
            pair = admitted[next(k for k in admitted if str(k[1]) == "10.2.0.10" and str(k[0]) == "10.1.0.10")]
            assert not pair.outbound.admitted and pair.inbound.admitted and not pair.initiator
            assert summary(view) == summary((await load_view(folder)).view)


class CountingHandler(TypeHandler):
    """The real handler, recording what each response carried."""

    def __init__(self, store: StateStore, type_url: str) -> None:
        super().__init__(store, type_url)
        self.batches: list[tuple[list[str], list[str]]] = []

    def apply(self, upserts: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]) -> list[Rejected]:
        self.batches.append(([n for n, _ in upserts], list(removed)))
        return super().apply(upserts, removed)


async def test_reconnect_sends_initial_versions_and_gets_only_the_changes(tmp_path: Path) -> None:
    folder = write_mesh(tmp_path / "mesh")
    async with running_ztd(tmp_path, config_dir=folder) as rz:
        options = XdsClientOptions(
            address=f"127.0.0.1:{rz.cfg.xds_port}", node_name="node-a", node_ip="192.168.50.1", plaintext=True
        )
        store = StateStore(settings())
        handlers = {t: CountingHandler(store, t) for t in (typeurls.ADDRESS, typeurls.AUTHORIZATION)}
        xds = DeltaXdsClient(options, handlers)
        store.expect_types(handlers)
        task = asyncio.create_task(xds._stream())
        await wait_for(store, lambda v: v.synced)
        first = len(handlers[typeurls.ADDRESS].batches[0][0])
        assert first >= 6  # 4 pods + 2 bridge pods (+ nothing else in this mesh)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # while disconnected: a2 goes away
        write_mesh(folder, pods={k: v for k, v in PODS.items() if k != "a2"})
        await asyncio.sleep(1.0)  # ztd polls its folder every 0.5s
        for h in handlers.values():
            h.batches.clear()
        task = asyncio.create_task(xds._stream())
        try:
            await wait_for(store, lambda v: len(v.pods_by_ip) == 3)
            addr = handlers[typeurls.ADDRESS].batches
            # the server knew what we held: no resource is re-sent, only a2's removal
            assert addr[0] == ([], ["Kubernetes//Pod/shop/a2"])
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_rejected_resources_are_nacked_by_name(tmp_path: Path) -> None:
    folder = write_mesh(tmp_path / "mesh")

    class Refusing(TypeHandler):
        def apply(self, upserts: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]) -> list[Rejected]:
            super().apply([u for u in upserts if not u[0].endswith("/b1")], removed)
            return [Rejected(n, "not today") for n, _ in upserts if n.endswith("/b1")]

    async with running_ztd(tmp_path, config_dir=folder) as rz:
        options = XdsClientOptions(
            address=f"127.0.0.1:{rz.cfg.xds_port}", node_name="node-a", node_ip="192.168.50.1", plaintext=True
        )
        store = StateStore(settings())
        handlers = {
            typeurls.ADDRESS: Refusing(store, typeurls.ADDRESS),
            **{typeurls.AUTHORIZATION: store.handlers()[typeurls.AUTHORIZATION]},
        }
        async with client(store, options, handlers) as xds:
            view = await wait_for(store, lambda v: v.synced)
            assert len(view.pods_by_ip) == 3  # b1 refused, the rest applied
            await poll(lambda: xds.status.nacks > 0)
            assert xds.status.held["WDS"] == 5  # b1's version is not held, so a reconnect asks for it again


async def test_a_stream_refused_by_the_server_is_retried_with_the_reason_kept(tmp_path: Path) -> None:
    folder = write_mesh(tmp_path / "mesh")
    async with running_ztd(tmp_path, config_dir=folder) as rz:
        token = tmp_path / "token"
        token.write_text(rz.token("shop/frontend"))  # not a bridge: its namespace is not the node's
        options = XdsClientOptions(
            address=f"127.0.0.1:{rz.cfg.secure_port}",
            node_name="node-a",
            node_ip="192.168.50.1",
            root_cert=rz.cfg.published_root,
            token_file=token,
            backoff_initial=0.05,
        )
        store = StateStore(settings())
        async with client(store, options) as xds:
            await poll(lambda: xds.status.connects >= 2)
            assert not store.view.synced
            assert xds.status.last_error.startswith("PERMISSION_DENIED: authorization failed")


def test_the_node_is_a_ztunnel_node_of_the_bridge_namespace() -> None:
    node = build_node(XdsClientOptions(address="x", node_name="node-a", node_ip="192.168.50.1"))
    assert node.id == "ztunnel~192.168.50.1~zt-bridge-node-a.istio-system~istio-system.svc.cluster.local"
    assert node.metadata.fields["NODE_NAME"].string_value == "node-a"
    assert grpc is not None
