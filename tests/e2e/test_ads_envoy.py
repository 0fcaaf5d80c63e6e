"""Real Envoy 1.40 sidecars whose bootstrap holds only `xds-grpc` (ztd's plaintext ADS port) and `sds-grpc`
(zt-agent): everything else comes from an in-process ztd over ADS, SotW or Delta.

Per protocol: an mTLS request passes frontend -> cart from generated config only; a resource Envoy must reject
(injected into the frontend's cache scope, as a broken builder would produce it) is NACKed, shown as ERROR
by `ztctl proxy-status` while traffic goes on, and cleared by the next good push; a pod added to the config
folder reaches the frontend's EDS without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import duration_pb2, json_format

from tests.helpers import RunningZtd, running_ztd, write_yaml
from tests.support import envoy as ev
from tests.support.agent import agent_for
from tests.support.sidecar_mesh import SIDECARS, App, Ports, Sidecar, applications, get, mesh_yaml, wait_for_secrets
from tests.support.wait import eventually
from ztcore.envoy.bootstrap import ads_bootstrap, node
from ztcore.xds import status as st
from ztcore.xds import typeurls
from ztcore.xds.resources import Resource
from ztctl.cli import main as ztctl

pytestmark = pytest.mark.slow

FRONTEND, CART = SIDECARS[0], SIDECARS[1]
CART_HOST = "cart.shop.svc.cluster.local"
INVALID = "zz-invalid-cluster"


@dataclass
class Mesh:
    ztd: RunningZtd
    ports: Ports
    app: App
    envoys: dict[str, ev.EnvoyProcess]
    config_dir: Path


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path, *, delta: bool) -> AsyncIterator[Mesh]:
    p = Ports()
    config_dir = tmp_path / "mesh"
    write_yaml(config_dir, "mesh.yaml", mesh_yaml(p))
    async with (
        running_ztd(tmp_path, config_dir=config_dir) as ztd,
        agent_for(ztd) as agent,
        applications(p) as app,
        contextlib.AsyncExitStack() as stack,
    ):
        envoys: dict[str, ev.EnvoyProcess] = {}
        for s in (FRONTEND, CART):
            boot = ads_bootstrap(
                node(s.node_id, s.metadata),
                xds_address=("127.0.0.1", ztd.cfg.xds_port),
                sds_socket=str(agent.cfg.socket),
                delta=delta,
            )
            config = json_format.MessageToDict(boot, preserving_proto_field_name=True)
            assert {c["name"] for c in config["static_resources"]["clusters"]} == {"xds-grpc", "sds-grpc"}
            assert "listeners" not in config["static_resources"]
            envoy = await ev.start_envoy(s.pod, config, tmp_path / "envoy")
            stack.push_async_callback(envoy.stop)
            envoys[s.pod] = envoy
        await asyncio.gather(*(wait_for_secrets(e) for e in envoys.values()))
        yield Mesh(ztd, p, app, envoys, config_dir)


def stream_of(ztd: RunningZtd, sidecar: Sidecar) -> Any:
    streams = [s for s in ztd.ztd.xds_streams.streams() if s.node.id == sidecar.node_id]
    assert len(streams) == 1, [s.node.id for s in ztd.ztd.xds_streams.streams()]
    return streams[0]


def cds_status(ztd: RunningZtd, sidecar: Sidecar) -> str:
    return str(stream_of(ztd, sidecar).statuses()[typeurls.CLUSTER].status)


def inject_invalid_cluster(ztd: RunningZtd, sidecar: Sidecar) -> None:
    """Test-only hook: a cluster Envoy must refuse (connect_timeout must be > 0), in that proxy's own scope."""
    binding = ztd.ztd.ads_source.binding_for(stream_of(ztd, sidecar))
    assert binding is not None and binding.scope
    bad = cluster_pb2.Cluster(
        name=INVALID, type=cluster_pb2.Cluster.STATIC, connect_timeout=duration_pb2.Duration(seconds=-1)
    )
    ztd.ztd.xds_cache.upsert(typeurls.CLUSTER, [Resource.pack(INVALID, bad)], scope=binding.scope)


def proxy_status(ztd: RunningZtd) -> tuple[int, dict[str, dict[str, str]]]:
    """`ztctl proxy-status -v` against ztd's plaintext port: {proxy: {type: cell}}."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ztctl(["proxy-status", "--plaintext", "--xds-address", f"127.0.0.1:{ztd.cfg.xds_port}", "-v"])
    lines = out.getvalue().splitlines()
    header = lines[0].split()
    # NAME CLUSTER <types…> ISTIOD VERSION; cells are "SYNCED (3s)" or "NOT SENT": split on 2+ spaces.
    kinds = header[2:-2]
    table = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        table[cells[0]] = {k: v.split(" (")[0] for k, v in zip(kinds, cells[2:], strict=False)}
    return code, table


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_sidecars_configured_over_ads(tmp_path: Path, delta: bool) -> None:
    async with mesh(tmp_path, delta=delta) as m, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        p, front = m.ports, FRONTEND.bind
        client = m.envoys["frontend-1"]
        pid = client.pid
        protocol = "delta" if delta else "sotw"
        assert {s.protocol for s in m.ztd.ztd.xds_streams.streams()} == {protocol}

        # 1. mTLS from generated config only.
        async def answered() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                return await get(http, front, p.svc_cart, CART_HOST) == (200, "hello from cart\n")
            return False

        await eventually(answered, within=15, what="a request through both sidecars")
        assert m.app.requests and "URI=spiffe://cluster.local/ns/shop/sa/frontend" in m.app.requests[-1]["xfcc"]
        for s in (FRONTEND, CART):
            assert {t: w.status for t, w in stream_of(m.ztd, s).statuses().items()} == {
                typeurls.CLUSTER: st.SYNCED,
                typeurls.ENDPOINT: st.SYNCED,
                typeurls.LISTENER: st.SYNCED,
                typeurls.ROUTE: st.SYNCED,
            }

        # 2. A resource Envoy rejects: NACKed, ERROR in proxy-status, the last good config still serving.
        inject_invalid_cluster(m.ztd, FRONTEND)
        await eventually(
            lambda: cds_status(m.ztd, FRONTEND) == st.ERROR, within=15, what="Envoy's NACK of the bad cluster"
        )
        watch = stream_of(m.ztd, FRONTEND).statuses()[typeurls.CLUSTER]
        assert "Expected positive duration" in watch.last_error  # Envoy's reason, recorded by ztd
        code, table = await asyncio.to_thread(proxy_status, m.ztd)
        assert code == 0
        assert table["frontend-1.shop"]["CDS"] == "ERROR" and table["frontend-1.shop"]["LDS"] == "SYNCED"
        assert table["cart-1.shop"]["CDS"] == "SYNCED"
        assert await get(http, front, p.svc_cart, CART_HOST) == (200, "hello from cart\n")
        dump = await client.config_dump()
        assert INVALID not in json.dumps(dump)

        # 3. A new endpoint (a pod added to the config folder) reaches Envoy's EDS without a restart; the
        # rebuild replaces the frontend's clusters, so the bad one is gone and the error clears.
        cart2 = (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: cart-2, namespace: shop, labels: {app: cart}}\n"
            f"spec: {{serviceAccountName: cart, nodeName: node-a, containers: [{{name: app, ports: "
            f"[{{name: http, containerPort: {p.cart_http}}}]}}]}}\nstatus: {{podIP: 127.0.0.5}}\n"
        )
        await asyncio.to_thread(write_yaml, m.config_dir, "cart-2.yaml", cart2)
        cluster = f"outbound|{p.svc_cart}||{CART_HOST}"

        async def new_endpoint() -> bool:
            _, text = await client.admin_get("/clusters")
            return f"{cluster}::127.0.0.5:{p.cart_http}::" in text

        await eventually(new_endpoint, within=15, what="the new pod in the frontend's EDS")
        _, text = await client.admin_get("/clusters")
        assert f"{cluster}::127.0.0.3:{p.cart_http}::" in text
        assert client.pid == pid and client.process.returncode is None
        await eventually(
            lambda: cds_status(m.ztd, FRONTEND) == st.SYNCED, within=15, what="the NACK cleared by a good push"
        )
        code, table = await asyncio.to_thread(proxy_status, m.ztd)
        assert table["frontend-1.shop"]["CDS"] == "SYNCED"
